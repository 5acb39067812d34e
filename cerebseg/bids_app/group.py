"""The group level (``cerebseg bids_dir output_dir group``): volume tables, QC list, report.

Reads every participant's ``*_seg-<seg>_morph.tsv`` and status file and writes, at the root of
the output folder:

- ``group_seg-<seg>_morph.tsv`` (+ ``.json``): one row per T1w; raw and ICV-normalised volumes,
  totals, the columns of the dataset's ``participants.tsv``, robust z-scores and outliers;
- ``group_qc.tsv``: the runs that failed or were flagged, with the reasons;
- ``group_report.html`` (figures in ``figures/``): distributions, asymmetry, outliers; each
  point links to its participant's report ``sub-<label>.html``.

Every file is rewritten (atomically) on each call.
"""
from __future__ import annotations

import csv
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cerebseg.bids_app.group_data import (ID_COLUMNS, NA, PALETTE, QC_COLUMNS, QC_TABLE, SEGS,
                                          SegGroup, fmt, run_ids)
from cerebseg.errors import UsageError
from cerebseg.utils.group_stats import (MAD_TO_SD, MIN_OUTLIER_N, MIN_OUTLIER_VOLUME_MM3,
                                        OUTLIER_Z, robust_z)
from cerebseg.utils.images import atomic_write_text

LOGGER = logging.getLogger('cerebseg.group')


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline='', encoding='utf-8') as fobj:
        return list(csv.DictReader(fobj, delimiter='\t'))


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return np.nan


def _clean(text) -> str:
    """One line of TSV-safe text (no tabs or newlines); empty -> n/a."""
    text = ' '.join(str(text).split()) if text is not None else ''
    return text or NA


def read_seg(output_dir, seg: str) -> SegGroup | None:
    """Every ``sub-*/[ses-*/]anat/*_seg-<seg>_morph.tsv`` of ``output_dir``; None if none."""
    tables = sorted(Path(output_dir).glob(f'sub-*/**/anat/*_seg-{seg}_morph.tsv'))
    if not tables:
        return None
    labels, text, names, counted = [], [], [], {}
    for path in tables:
        recs = _read_tsv(path)
        if recs and 'name' not in recs[0]:
            LOGGER.warning('Skipping %s: not a volume table (no "name" column).', path)
            continue
        labels.append(path.name.split('_seg-')[0])
        text.append({r['name']: (r.get('volume_mm3', NA), r.get('volume_icv_fraction', NA))
                     for r in recs})
        for r in recs:
            if r['name'] not in counted:
                names.append(r['name'])
                counted[r['name']] = _float(r.get('index')) > 0  # part sums: index n/a
    if not labels:
        return None
    mm3 = np.array([[_float(t.get(n, (NA, NA))[0]) for n in names] for t in text])
    icv = np.array([[_float(t.get(n, (NA, NA))[1]) for n in names] for t in text])
    return SegGroup(seg=seg, labels=labels, ids=[run_ids(lab) for lab in labels], names=names,
                    counted=[counted[n] for n in names], text=text, mm3=mm3, icv=icv,
                    z=robust_z(icv))


def read_statuses(output_dir, subject: str | None = None) -> dict[str, dict]:
    """The newest status (by its ``finished``, then ``started`` time) of each run label, from
    ``sub-*/log/<run_uuid>/<label>_status.json`` (``subject``: that participant's only);
    unreadable files are skipped with a warning."""
    newest: dict[str, dict] = {}
    pattern = f'sub-{subject}/log/*/*_status.json' if subject else 'sub-*/log/*/*_status.json'
    for path in sorted(Path(output_dir).glob(pattern)):
        try:
            status = json.loads(path.read_text(encoding='utf-8'))
            label = status.get('label') or path.name[:-len('_status.json')]
            run_ids(label)
        except (OSError, ValueError, KeyError, AttributeError) as err:
            LOGGER.warning('Skipping the unreadable status file %s: %s', path, err)
            continue
        status.setdefault('run_uuid', path.parent.name)
        old = newest.get(label)
        if old is None or _when(status) >= _when(old):
            newest[label] = status
    return newest


def _when(status: dict) -> tuple[float, float]:
    """POSIX times of a status' ``finished`` and ``started`` (ISO 8601; -inf when missing or
    unreadable)."""
    out = []
    for key in ('finished', 'started'):
        try:
            when = datetime.fromisoformat(str(status.get(key)))
        except ValueError:
            out.append(-np.inf)
            continue
        out.append((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp())
    return tuple(out)


def read_participants(bids_dir) -> tuple[list[str], dict[str, dict[str, str]], dict]:
    """Columns (without participant_id), rows by participant_id, and the column descriptions
    of the dataset's ``participants.tsv`` / ``.json``; empty when there is none."""
    path = Path(bids_dir) / 'participants.tsv'
    if not path.is_file():
        return [], {}, {}
    recs = _read_tsv(path)
    with open(path, newline='', encoding='utf-8') as fobj:
        header = next(csv.reader(fobj, delimiter='\t'), [])
    rows = {}
    for r in recs:
        pid = (r.get('participant_id') or '').strip()
        if pid:
            rows[pid if pid.startswith('sub-') else f'sub-{pid}'] = r
    try:
        meta = json.loads((path.with_suffix('.json')).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        meta = {}
    return [c for c in header if c != 'participant_id'], rows, meta if isinstance(meta, dict) \
        else {}


def _group_columns(grp: SegGroup, pcols: list[str]) -> list[str]:
    taken = set(ID_COLUMNS) | set(grp.names) | {f'{n}_icv' for n in grp.names} | \
        {f'{n}_z' for n in grp.names} | {'total_mm3', 'total_icv', 'n_outliers',
                                         'outlier_structures'}
    clash = [c for c in pcols if c in taken]
    if clash:
        LOGGER.warning('participants.tsv columns %s clash with the group table\'s and are left '
                       'out of group_seg-%s_morph.tsv', clash, grp.seg)
    return [c for c in pcols if c not in taken]


def group_table(grp: SegGroup, pcols: list[str], participants: dict) -> list[list[str]]:
    """The rows (header first) of ``group_seg-<seg>_morph.tsv``, as text."""
    pcols = _group_columns(grp, pcols)
    header = list(ID_COLUMNS) + grp.names + [f'{n}_icv' for n in grp.names] + \
        ['total_mm3', 'total_icv'] + pcols + [f'{n}_z' for n in grp.names] + \
        ['n_outliers', 'outlier_structures']
    counted = np.array(grp.counted)
    rows = [header]
    for i, ids in enumerate(grp.ids):
        vals = [grp.text[i].get(n, (NA, NA)) for n in grp.names]
        total = [grp.mm3[i, counted].sum(), grp.icv[i, counted].sum()] if counted.any() \
            else [np.nan, np.nan]
        prow = participants.get(ids[0], {})
        flagged = grp.outlier_names(i)
        rows.append(list(ids) + [_clean(v[0]) for v in vals] + [_clean(v[1]) for v in vals]
                    + [fmt(total[0], '.1f'), fmt(total[1], '.6e')]
                    + [_clean(prow.get(c)) for c in pcols]
                    + [fmt(z, '.2f') for z in grp.z[i]]
                    + [str(len(flagged)), ','.join(flagged) or NA])
    return rows


def group_sidecar(grp: SegGroup, header: list[str], pmeta: dict) -> dict:
    """Column descriptions of ``group_seg-<seg>_morph.tsv`` (BIDS tabular-file sidecar)."""
    meta = {
        'participant_id': {'Description': 'The participant (sub-<label>).'},
        'session_id': {'Description': 'The session (ses-<label>); n/a without sessions.'},
        'run': {'Description': 'The run index of the T1w; n/a without a run entity.'},
        'total_mm3': {'Description': f'Sum of the {grp.seg} labels\' volumes (the part sums, '
                                     'index n/a in the participant tables, are not counted '
                                     'again).', 'Units': 'mm^3'},
        'total_icv': {'Description': 'total_mm3 divided by the estimated intracranial volume '
                                     '(a fraction, no unit).'},
        'n_outliers': {'Description': f'Number of structures whose |robust z| > {OUTLIER_Z} '
                                      f'(none with fewer than {MIN_OUTLIER_N} rows, none in '
                                      f'structures whose median volume is under '
                                      f'{MIN_OUTLIER_VOLUME_MM3:g} mm^3).'},
        'outlier_structures': {'Description': f'The structures whose |robust z| > {OUTLIER_Z} '
                                              '(comma-separated); n/a if none.'},
    }
    for name, counted in zip(grp.names, grp.counted):
        what = '' if counted else ' (a sum of labels)'
        meta[name] = {'Description': f'Volume of {name}{what} in the T1w\'s native space.',
                      'Units': 'mm^3'}
        meta[f'{name}_icv'] = {'Description': f'Volume of {name}{what} divided by the '
                                              'estimated intracranial volume (a fraction, no '
                                              'unit).'}
        meta[f'{name}_z'] = {'Description': f'Robust z-score of {name}_icv over all rows of '
                                            f'this table: (x - median) / ({MAD_TO_SD} MAD), the '
                                            'standard deviation where the MAD is 0.'}
    for col in header:
        if col not in meta:
            given = pmeta.get(col)
            meta[col] = given if isinstance(given, dict) else {
                'Description': f'{col}, from the dataset\'s participants.tsv.'}
    return {col: meta[col] for col in header}


def qc_rows(groups: list[SegGroup], statuses: dict[str, dict]) -> list[dict[str, str]]:
    """One row per run that failed or was flagged (QC_COLUMNS), sorted by run label."""
    with_tables = {lab for g in groups for lab in g.labels}
    out = []
    for label in sorted(with_tables | set(statuses)):
        status = statuses.get(label)
        failed, flagged = [], []
        if status is not None:
            code = status.get('exit_code')
            if code not in (0, None):
                failed.append(f'exit code {code}: {status.get("message") or "no message"}')
            for flag in status.get('qc_flags') or []:
                if not isinstance(flag, dict):
                    continue
                where = f' ({flag["structure"]})' if flag.get('structure') else ''
                flagged.append(f'{flag.get("kind", "qc")}{where}: {flag.get("message", "")}')
        if label not in with_tables:
            failed.append('no volume table')
        for grp in groups:
            if label in grp.labels:
                names = grp.outlier_names(grp.labels.index(label))
                if names:
                    flagged.append(f'outlier volumes ({grp.seg}, |z| > {OUTLIER_Z}): '
                                   + ', '.join(names))
        if failed or flagged:
            ids = run_ids(label)
            out.append(dict(zip(QC_COLUMNS, (*ids, 'failed' if failed else 'flagged',
                                             _clean('; '.join(failed + flagged)),
                                             f'{ids[0]}.html'))))
    return out


def _tsv(rows: list[list[str]]) -> str:
    return ''.join('\t'.join(r) + '\n' for r in rows)


def write_group_outputs(output_dir, bids_dir, group_by: str | None = None) -> list[Path]:
    """Write the group tables, the QC list and the report of ``output_dir`` (see the module).

    Parameters
    ----------
    output_dir : path
        The cerebseg output folder (the participant level's).
    bids_dir : path
        The input BIDS dataset (its ``participants.tsv`` is joined to the tables).
    group_by : str or None
        A column of ``participants.tsv`` whose values split the report's distributions.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    UsageError
        No participant results, or ``group_by`` is not a column of ``participants.tsv``.
    """
    output_dir, bids_dir = Path(output_dir), Path(bids_dir)
    groups = [g for g in (read_seg(output_dir, seg) for seg in SEGS) if g is not None]
    statuses = read_statuses(output_dir)
    if not groups and not statuses:
        raise UsageError(f'No participant results in {output_dir} (no sub-*/anat/*_morph.tsv): '
                         'run the participant level first (cerebseg bids_dir output_dir '
                         'participant).')
    pcols, participants, pmeta = read_participants(bids_dir)
    if group_by and group_by not in pcols:
        where = bids_dir / 'participants.tsv'
        raise UsageError(f'--group-by {group_by}: no such column in {where}' + (
            f'; it has {", ".join(pcols)}.' if pcols else
            ' (the file is missing or has no columns besides participant_id).'))
    written = []
    for grp in groups:
        rows = group_table(grp, pcols, participants)
        base = output_dir / f'group_seg-{grp.seg}_morph'
        written.append(atomic_write_text(base.with_suffix('.tsv'), _tsv(rows)))
        written.append(atomic_write_text(base.with_suffix('.json'), json.dumps(
            group_sidecar(grp, rows[0], pmeta), indent=2) + '\n'))
    qc = qc_rows(groups, statuses)
    written.append(atomic_write_text(output_dir / QC_TABLE, _tsv(
        [list(QC_COLUMNS)] + [[r[c] for c in QC_COLUMNS] for r in qc])))
    levels = {}
    if group_by:
        levels = {pid: _clean(r.get(group_by)) for pid, r in participants.items()}
        if len(set(levels.values())) > len(PALETTE):
            LOGGER.warning('--group-by %s: %d values, more than the %d colours of the plots '
                           '(they repeat); a column with a few values (e.g. a diagnosis) '
                           'reads best.', group_by, len(set(levels.values())), len(PALETTE))
    from cerebseg.bids_app.group_report import write_report

    written += write_report(output_dir, groups, qc, statuses, levels, group_by)
    return written
