"""The parts of the brainstem (midbrain, pons, medulla) and their summary rows.

The brainstem label set (:mod:`cerebseg.assets.brainstem_atlas`) gives each label a ``part`` in its
lookup table; the morph table sums them (:func:`part_rows`). The segmentation methods are in
:mod:`cerebseg.models.brainstem_methods`.
"""
from __future__ import annotations

#: the parts of the brainstem, in the order of the morph table's summary rows
PARTS = ('midbrain', 'pons', 'medulla')


def part_rows(volumes_mm3: dict[int, float], lut: list[dict]) -> list[tuple[str, float]]:
    """Summary rows of the morph table: each part (the sum of its labels, from the lookup
    table's ``part`` column) and the whole brainstem, as ``(name, volume_mm3)``."""
    rows = []
    for part in PARTS:
        members = [r['index'] for r in lut if r.get('part') == part]
        rows.append((part.capitalize(), float(sum(volumes_mm3.get(i, 0.0) for i in members))))
    rows.append(('Whole_Brainstem', float(sum(v for i, v in volumes_mm3.items() if i))))
    return rows
