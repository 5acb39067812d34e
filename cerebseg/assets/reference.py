"""Reference ranges of cerebellar lobule volumes, for the reports' plausibility flags.

Built from the published per-lobule volumes of Chardon et al. (HNU test-retest data, 9 adults
x 10 sessions; CERES, DeepCERES and ACAPULCO). Per pipeline and structure: the mean and SD over
participants of each participant's mean over sessions; the range is the union over pipelines
of mean +- 3 SD, so that it spans the pipelines' disagreement too. ``Total``: the sum of the
lobules. Plausibility ranges, not ground truth: 9 young adults, other protocols.

The pipelines follow Park 2014's protocol (CERES), that of cerebseg's ``cobra`` library (ranges
as published); cerebseg's SUIT protocol cuts the lobules differently (its lobule X, for one, is
larger). Each protocol's ranges are the reference ones times the ratio of the structure's volume
in the protocol's template atlas to its volume in CoBra, the template atlas of Park 2014's
protocol (``cerebseg/data/reference_map.json``).
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


def atlas_volumes(dseg: Path, groups: dict[str, list[int] | dict[int, float]]) -> dict:
    """Volume (mm^3) of each named group of labels (a list, or label -> weight) in a label
    map; ``Total``: the sum of the groups."""
    import nibabel as nib

    img = nib.load(dseg)
    counts = np.bincount(np.asarray(img.dataobj).astype(np.int64).ravel())
    voxel = float(np.prod(img.header.get_zooms()[:3]))
    out = {}
    for name, labels in groups.items():
        weights = labels if isinstance(labels, dict) else {i: 1.0 for i in labels}
        out[name] = voxel * sum(w * (counts[i] if i < counts.size else 0)
                                for i, w in weights.items())
    out['Total'] = sum(out.values())
    return out


def protocol_factors(sources: Path, spec: dict, protocol: str) -> dict[str, float]:
    """Reference structure -> V(protocol's template atlas) / V(CoBra); 1 for a protocol that
    is the reference pipelines' own (its atlas marked ``reference``)."""
    from cerebseg.assets.sources import source_path
    from cerebseg.utils.native import read_lut_tsv

    if spec['atlases'][protocol].get('reference'):
        return {name: 1.0 for name in [*spec['protocols'][protocol], 'Total']}
    ref = atlas_volumes(source_path(sources, spec['reference_atlas']['dseg']),
                        spec['reference_atlas']['labels'])
    atlas = spec['atlases'][protocol]
    index = {r['name']: r['index'] for r in read_lut_tsv(source_path(sources, atlas['lut']))}
    groups = {name: {index[label]: w for label, w in parts.items()}
              for name, parts in spec['protocols'][protocol].items()}
    own = atlas_volumes(source_path(sources, atlas['dseg']), groups)
    return {name: own[name] / ref[name] for name in own if ref.get(name)}


def build_reference(sources: Path, out: Path) -> dict:
    """Write ``out/reference/cerebellum_volumes.json``; returns the manifest section."""
    from cerebseg.assets import package_json
    from cerebseg.assets.sources import source_path

    per_pipeline = {name: participant_means(source_path(sources, f'{FOLDER}/{file}'), factor)
                    for name, (file, factor) in PIPELINES.items()}
    ranges = reference_ranges(per_pipeline)
    spec = package_json('reference_map.json')
    protocols = {}
    for protocol in spec['protocols']:
        factors = protocol_factors(sources, spec, protocol)
        protocols[protocol] = {name: {'low': rng['low'] * factors[name],
                                      'high': rng['high'] * factors[name],
                                      'factor': factors[name]}
                               for name, rng in ranges.items() if name in factors}
    rel = 'reference/cerebellum_volumes.json'
    doc = {'description': __doc__.strip().splitlines()[0], 'method':
           f'union over pipelines of mean +- {N_SD:g} SD over participants (mm^3)',
           'citation': CITATION, 'licence': LICENCE, 'structures': ranges,
           'protocols': protocols}
    (out / 'reference').mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / rel, json.dumps(doc, indent=2) + '\n')
    LOGGER.info('Reference ranges of %d structures from %s', len(ranges), ', '.join(PIPELINES))
    return {'cerebellum_volumes': rel, 'citation': CITATION, 'licence': LICENCE}
