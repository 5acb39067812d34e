"""What the group level's tables and report share: names, the runs' identifiers and one
structure set of every run (:class:`SegGroup`).

:mod:`cerebseg.bids_app.group` reads and writes the tables, :mod:`cerebseg.bids_app.group_report`
draws the report; both import this module (and not each other).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from cerebseg.utils.group_stats import MIN_OUTLIER_N, MIN_OUTLIER_VOLUME_MM3, outliers

SEGS = ('cerebellum', 'brainstem')
NA = 'n/a'
ID_COLUMNS = ('participant_id', 'session_id', 'run')
QC_COLUMNS = ('participant_id', 'session_id', 'run', 'status', 'reasons', 'report')
REPORT = 'group_report.html'
QC_TABLE = 'group_qc.tsv'
#: level colours of the plots (matplotlib's tab10 without its red, kept for outliers)
PALETTE = ('#1f77b4', '#ff7f0e', '#2ca02c', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
           '#bcbd22', '#17becf')


@dataclass
class SegGroup:
    """One structure set (``seg``) of every run: text values as read, arrays for the numerics.

    ``mm3``, ``icv`` and ``z`` are ``(N runs, K structures)`` float arrays (NaN where missing),
    ``flags`` the bool outliers (none in structures whose median volume is under
    ``MIN_OUTLIER_VOLUME_MM3``); ``labels`` are the run labels (``sub-01_ses-a_run-2``) and
    ``ids`` their (participant_id, session_id, run).
    """

    seg: str
    labels: list[str]
    ids: list[tuple[str, str, str]]
    names: list[str]
    counted: list[bool]
    text: list[dict[str, tuple[str, str]]]
    mm3: np.ndarray
    icv: np.ndarray
    z: np.ndarray
    flags: np.ndarray = field(init=False)

    def __post_init__(self):
        self.flags = outliers(self.z, min_n=MIN_OUTLIER_N)
        with warnings.catch_warnings():   # an all-NaN column has no median
            warnings.simplefilter('ignore', RuntimeWarning)
            small = ~(np.nanmedian(self.mm3, axis=0) >= MIN_OUTLIER_VOLUME_MM3)
        self.flags[:, small] = False

    def outlier_names(self, row: int) -> list[str]:
        return [n for n, f in zip(self.names, self.flags[row]) if f]


def fmt(value: float, spec: str) -> str:
    """``value`` formatted with ``spec``; n/a when it is not finite."""
    return NA if not np.isfinite(value) else format(value, spec)


def run_ids(label: str) -> tuple[str, str, str]:
    """(participant_id, session_id, run) of a run label such as ``sub-01_ses-a_run-2``."""
    from cerebseg.interfaces.bids import source_entities

    ents = source_entities(f'{label}_T1w.nii.gz')
    return (f'sub-{ents["sub"]}', f'ses-{ents["ses"]}' if 'ses' in ents else NA,
            ents.get('run', NA))
