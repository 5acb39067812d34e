"""Reference ranges of cerebellar lobule volumes, for the reports' plausibility flags.

Built from the published per-lobule volumes of Chardon et al. (HNU test-retest data, 9 adults
x 10 sessions; CERES, DeepCERES and ACAPULCO). Per pipeline and structure: the mean and SD over
participants of each participant's mean over sessions; the range is the union over pipelines
of mean +- 3 SD, so that it spans the pipelines' disagreement too. ``Total``: the sum of the
lobules. Plausibility ranges, not ground truth: 9 young adults, other protocols.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from cerebseg.utils.images import atomic_write_text

LOGGER = logging.getLogger('cerebseg.assets.reference')

FOLDER = 'reference/reliability_cerebellar_volumetry'
#: pipeline -> (file, factor to mm^3)
PIPELINES = {'CERES': ('all_volumes_cm3_ceres.csv', 1000.0),
             'DeepCERES': ('all_volumes_cm3_deepCeres.csv', 1000.0),
             'ACAPULCO': ('all_volumes_cm3_acapulco.csv', 1.0)}   # this one is in mm^3
#: half-width of each pipeline's range, in SDs
N_SD = 3.0
CITATION = ('Chardon K, Xu T, Chupin M, Duchesnay E, Boido D, Laidi C. Towards reliable '
            'measurement of cerebellar morphology: a comparative assessment of segmentation '
            'pipelines (data: github.com/kchardon/reliability-cerebellar-volumetry, e25effc).')
LICENCE = 'CC BY-NC 4.0'


def participant_means(path: Path, factor: float) -> dict[str, np.ndarray]:
    """Structure -> one volume (mm^3) per participant (mean over sessions)."""
    with open(path, newline='') as fobj:
        rows = list(csv.DictReader(fobj))
    structures = [c for c in rows[0] if c.startswith(('Left.', 'Right.'))]
    ids = sorted({r['ID'] for r in rows})
    out = {}
    for name in structures:
        out[name] = np.array([np.mean([float(r[name]) for r in rows if r['ID'] == i])
                              for i in ids]) * factor
    out['Total'] = np.sum([out[n] for n in structures], axis=0)
    return out


def reference_ranges(per_pipeline: dict[str, dict[str, np.ndarray]], n_sd: float = N_SD) -> dict:
    """``{structure: {'low', 'high', 'pipelines': {name: {'mean', 'sd', 'n'}}}}``."""
    names = sorted(set.intersection(*(set(v) for v in per_pipeline.values())))
    out = {}
    for name in names:
        stats = {p: {'mean': float(v[name].mean()), 'sd': float(v[name].std(ddof=1)),
                     'n': int(v[name].size)} for p, v in per_pipeline.items()}
        out[name] = {'low': min(s['mean'] - n_sd * s['sd'] for s in stats.values()),
                     'high': max(s['mean'] + n_sd * s['sd'] for s in stats.values()),
                     'pipelines': stats}
    return out


def build_reference(sources: Path, out: Path) -> dict:
    """Write ``out/reference/cerebellum_volumes.json``; returns the manifest section."""
    from cerebseg.assets.build import _source

    per_pipeline = {name: participant_means(_source(sources, f'{FOLDER}/{file}'), factor)
                    for name, (file, factor) in PIPELINES.items()}
    ranges = reference_ranges(per_pipeline)
    rel = 'reference/cerebellum_volumes.json'
    doc = {'description': __doc__.strip().splitlines()[0], 'method':
           f'union over pipelines of mean +- {N_SD:g} SD over participants (mm^3)',
           'citation': CITATION, 'licence': LICENCE, 'structures': ranges}
    (out / 'reference').mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / rel, json.dumps(doc, indent=2) + '\n')
    LOGGER.info('Reference ranges of %d structures from %s', len(ranges), ', '.join(PIPELINES))
    return {'cerebellum_volumes': rel, 'citation': CITATION, 'licence': LICENCE}
