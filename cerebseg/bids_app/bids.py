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


#: what the BIDS validator must not read: logs, reports, transforms (BEP014, not yet in the
#: specification), volume tables, the uncertainty maps and the group files
#: (folders without a trailing slash: validator 3.0.2 reports ``log/`` and ``**/log/`` as
#: NOT_INCLUDED but honours ``**/log``)
BIDSIGNORE = ('**/log', '**/figures', 'sub-*.html', 'group_*', '*_morph.tsv', '*_morph.json',
              '*_xfm.mat', '*_uncertainty.nii.gz', '*_uncertainty.json')

#: the columns of the lookup tables (``seg-<seg>_dseg.tsv``) that BIDS does not define (it
#: defines index, name, abbreviation, color and mapping), for their JSON sidecars
LUT_COLUMNS = {
    'part': 'The brainstem part the label belongs to (midbrain, pons or medulla; n/a for '
            'nuclei across parts and for the background).',
    'source': 'The atlases and label values the label was built from (cerebseg-assets build).',
    'licence': 'The licences of those source atlases.',
}

_README = """# cerebseg derivatives

Made by cerebseg {version} from the BIDS dataset {source}.

- `sub-<label>.html`: the participant's quality-control report (figures in
  `sub-<label>/figures/`). Review it before using the volumes.
- `sub-<label>/[ses-<label>/]anat/`: label maps on the T1w grid (`space-T1w_seg-*_dseg`) and in
  MNI152NLin2009cAsym (`seg-cerebellum_res-05`, `seg-brainstem_res-1`), the affine to the
  template (`*_xfm.mat`, ANTs), and the volume tables (`*_morph.tsv`, native mm3 and the
  fraction of the intracranial volume). Every image has a JSON sidecar that gives the method,
  its inputs and its quality figures.
- `seg-cerebellum_dseg.tsv`, `seg-brainstem_dseg.tsv`: the lookup tables of the labels.
- `group_*` and `group_report.html` (after `cerebseg ... group`): one row per T1w, robust
  z-scores and outlier flags, distribution plots.
- `sub-<label>/log/`: the run configuration, status and any crash files.

Files that the BIDS specification does not cover yet (transforms, volume tables, reports,
logs) are listed in `.bidsignore`.
"""


#: the ``desc-<label>`` entities cerebseg writes (``descriptions.tsv``)
DESCRIPTIONS = {
    'preproc': 'The T1w on the working box as the atlas fusion and the networks see it (N4, '
               'non-local means denoising, affine to MNI152NLin2009cAsym, 2nd/98th '
               'foreground percentiles scaled to 0/1).',
    'prior': 'The multi-atlas labels given to the networks as their prior (runs with '
             '--models other than none).',
}


def write_descriptions(output_dir) -> Path:
    """``descriptions.tsv``: what each ``desc`` entity of the derivatives means."""
    rows = ['desc_id\tdescription'] + [f'desc-{k}\t{v}' for k, v in DESCRIPTIONS.items()]
    return atomic_write_text(Path(output_dir) / 'descriptions.tsv', '\n'.join(rows) + '\n')


def write_bidsignore(output_dir) -> Path:
    """``.bidsignore`` with cerebseg's patterns, keeping any lines a user added."""
    path = Path(output_dir) / '.bidsignore'
    lines = path.read_text().splitlines() if path.exists() else []
    lines += [p for p in BIDSIGNORE if p not in lines]
    return atomic_write_text(path, '\n'.join(lines) + '\n')


def write_derivatives_readme(bids_dir, output_dir) -> Path | None:
    """The derivatives' ``README.md`` (the validator's README_FILE_MISSING), unless one exists
    (a user's is never overwritten)."""
    out = Path(output_dir)
    if any((out / name).exists() for name in ('README', 'README.md', 'README.txt', 'README.rst')):
        return None
    return atomic_write_text(out / 'README.md',
                             _README.format(version=__version__, source=Path(bids_dir).name))


def write_lut(lut: str | os.PathLike, output_dir, seg: str) -> Path:
    """Copy a lookup table to ``seg-<seg>_dseg.tsv``, with a sidecar describing the columns
    that BIDS does not define (none: no sidecar). The sidecar has no ``Description``: by
    BIDS inheritance it would override the dseg images' own."""
    import csv

    from cerebseg.utils.images import atomic_copy

    out = Path(output_dir) / f'seg-{seg}_dseg.tsv'
    atomic_copy(lut, out)
    with open(lut, newline='') as fobj:
        header = next(csv.reader(fobj, delimiter='\t'))
    meta = {col: {'Description': LUT_COLUMNS[col]} for col in header if col in LUT_COLUMNS}
    sidecar = out.with_suffix('.json')
    if meta:
        atomic_write_text(sidecar, json.dumps(meta, indent=2) + '\n')
    elif sidecar.exists():
        sidecar.unlink()
    return out

