"""BIDS input collection and dataset-level derivative files."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cerebseg import __version__
from cerebseg.errors import BadDataError, UsageError
from cerebseg.utils.images import atomic_write_text

LOGGER = logging.getLogger('cerebseg.bids')

DEFAULT_FILTERS = {
    't1w': {'datatype': 'anat', 'suffix': 'T1w', 'extension': ['.nii', '.nii.gz']},
    't2w': {'datatype': 'anat', 'suffix': 'T2w', 'extension': ['.nii', '.nii.gz']},
}


@dataclass(frozen=True)
class RunInputs:
    """One output set: a T1w and the T2w paired with it (or None)."""

    subject: str
    session: str | None
    t1w: str
    t2w: str | None

    @property
    def label(self) -> str:
        from cerebseg.interfaces.bids import source_entities

        ents = source_entities(self.t1w)
        return '_'.join(f'{k}-{v}' for k, v in ents.items())


def load_filters(path: str | os.PathLike | None) -> dict:
    filters = {k: dict(v) for k, v in DEFAULT_FILTERS.items()}
    if not path:
        return filters
    try:
        user = json.loads(Path(path).read_text())
    except ValueError as err:
        raise UsageError(f'The BIDS filter file {path} is not valid JSON: {err}') from err
    if not isinstance(user, dict) or set(user) - set(DEFAULT_FILTERS):
        raise UsageError(f'The BIDS filter file {path} may only have the keys '
                         f'{sorted(DEFAULT_FILTERS)}, each a dict of pybids entities.')
    for key, value in user.items():
        filters[key].update(value)
    return filters


def _layout(bids_dir: Path, validate: bool):
    from bids import BIDSLayout
    from bids.exceptions import BIDSValidationError

    if not (bids_dir / 'dataset_description.json').is_file():
        raise BadDataError(f'{bids_dir} is not a BIDS dataset: dataset_description.json is '
                           'missing. Point bids_dir at the root of a BIDS dataset.')
    try:
        return BIDSLayout(str(bids_dir), validate=validate)
    except (BIDSValidationError, ValueError) as err:
        raise BadDataError(f'{bids_dir} is not a valid BIDS dataset: {err}') from err


def _pair_t2w(t1w, t2ws: list) -> str | None:
    """The T2w for a T1w: the one with the same run entity, else the only one in the session."""
    if not t2ws:
        return None
    if len(t2ws) == 1:
        return t2ws[0].path
    same_run = [f for f in t2ws if f.entities.get('run') == t1w.entities.get('run')
                and 'run' in t1w.entities]
    if len(same_run) == 1:
        return same_run[0].path
    names = ', '.join(sorted(Path(f.path).name for f in t2ws))
    raise BadDataError(
        f'Cannot pair a T2w with {t1w.path}: the session has several T2w images ({names}) and '
        'none shares its run entity. Select one with --bids-filter-file '
        '(e.g. {"t2w": {"acquisition": "..."}}) or use --t1-only.')


def collect_inputs(bids_dir: str | os.PathLike, participant_label=(), session_label=(),
                   filters: dict | None = None, t1_only: bool = False,
                   validate: bool = True) -> list[RunInputs]:
    """Every T1w of the selected participants and sessions, with its paired T2w.

    One output set per T1w (several runs give several sets, named with their ``run`` entity).
    A T2w is paired within its session: the one with the same ``run``, else the only one.
    """
    bids_dir = Path(bids_dir)
    filters = filters or load_filters(None)
    layout = _layout(bids_dir, validate)
    subjects = layout.get_subjects()
    if not subjects:
        raise BadDataError(f'The BIDS dataset {bids_dir} has no participants (no sub-* folder).')
    wanted = list(participant_label) or subjects
    unknown = sorted(set(wanted) - set(subjects))
    if unknown:
        raise UsageError(f'Participant(s) {unknown} not found in {bids_dir}; it has '
                         f'{sorted(subjects)[:20]}{" ..." if len(subjects) > 20 else ""}.')
    runs = []
    for sub in sorted(wanted):
        query = {'subject': sub, 'return_type': 'object'}
        if session_label:
            query['session'] = list(session_label)
        t1ws = layout.get(**query, **filters['t1w'])
        if not t1ws:
            raise BadDataError(
                f'No T1w image for sub-{sub} in {bids_dir}'
                + (f' (sessions {list(session_label)})' if session_label else '')
                + ' matching the filters '
                + json.dumps(filters['t1w']) + '. cerebseg needs a T1w; check the file names '
                '(sub-<label>[_ses-<label>]_T1w.nii.gz) or the filter file.')
        for t1w in sorted(t1ws, key=lambda f: f.path):
            ses = t1w.entities.get('session')
            t2w = None
            if not t1_only:
                t2q = {'subject': sub, 'return_type': 'object', **filters['t2w']}
                t2q['session'] = ses if ses else None
                t2w = _pair_t2w(t1w, layout.get(**t2q))
            runs.append(RunInputs(subject=sub, session=ses, t1w=t1w.path, t2w=t2w))
    return runs


def write_derivative_description(bids_dir, output_dir) -> Path:
    """``dataset_description.json`` of the derivatives (DatasetType, GeneratedBy, sources)."""
    generated = {'Name': 'cerebseg', 'Version': __version__,
                 'CodeURL': 'https://github.com/cerebseg/cerebseg'}
    container = os.environ.get('CEREBSEG_CONTAINER')
    if container:
        generated['Container'] = {'Type': container,
                                  'Tag': f'cerebseg/cerebseg:{__version__}'}
    desc = {'Name': 'cerebseg output', 'BIDSVersion': '1.10.0', 'DatasetType': 'derivative',
            'GeneratedBy': [generated]}
    src = Path(bids_dir) / 'dataset_description.json'
    try:
        raw = json.loads(src.read_text())
        doi = raw.get('DatasetDOI')
        url = f'doi:{doi}' if doi else Path(bids_dir).as_uri()
        desc['SourceDatasets'] = [{'URL': url}]
    except (OSError, ValueError):
        desc['SourceDatasets'] = [{'URL': Path(bids_dir).as_uri()}]
    return atomic_write_text(Path(output_dir) / 'dataset_description.json',
                             json.dumps(desc, indent=2) + '\n')


def write_group_tables(output_dir) -> list[Path]:
    """The group tables of every structure with participant results (cerebellum, brainstem);
    UsageError when there are none at all."""
    output_dir = Path(output_dir)
    segs = [seg for seg in ('cerebellum', 'brainstem')
            if any(output_dir.glob(f'sub-*/**/anat/*_seg-{seg}_morph.tsv'))]
    if not segs:
        raise UsageError(f'No participant results in {output_dir}: run the participant level '
                         'first.')
    return [write_group_table(output_dir, seg) for seg in segs]


def write_group_table(output_dir, seg: str = 'cerebellum') -> Path:
    """Gather every participant's ``*_seg-<seg>_morph.tsv`` into one wide table,
    ``group_seg-<seg>_morph.tsv`` (one row per participant/session/run, one column per
    structure, native mm^3)."""
    import csv

    output_dir = Path(output_dir)
    tables = sorted(output_dir.glob(f'sub-*/**/anat/*_seg-{seg}_morph.tsv'))
    if not tables:
        raise UsageError(f'No participant results for seg-{seg} in {output_dir}: run the '
                         'participant level first.')
    from cerebseg.interfaces.bids import source_entities

    names, rows = None, []
    for path in tables:
        with open(path, newline='') as fobj:
            recs = list(csv.DictReader(fobj, delimiter='\t'))
        if names is None:
            names = [r['name'] for r in recs]
        ents = source_entities(path.name)
        row = {'participant_id': f"sub-{ents['sub']}", 'session_id': ents.get('ses', 'n/a'),
               'run': ents.get('run', 'n/a')}
        row.update({r['name']: r['volume_mm3'] for r in recs})
        rows.append(row)
    header = ['participant_id', 'session_id', 'run'] + names
    lines = ['\t'.join(header)] + ['\t'.join(str(r.get(h, 'n/a')) for h in header) for r in rows]
    return atomic_write_text(output_dir / f'group_seg-{seg}_morph.tsv',
                             '\n'.join(lines) + '\n')
