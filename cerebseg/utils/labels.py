"""Label tables of the cerebellum protocols: left/right swaps, hemispheres, class indices.

A protocol's lookup table (``seg-cerebellum_dseg.tsv``) names its labels ``Left_*``,
``Right_*`` or anything else (midline: vermis). The cascade's first stage segments
background / left / right cerebellum (:data:`HEMISPHERE_LABELS`); midline labels are split at
x = 0 mm of the template (the working grid is symmetric about it).
"""
from __future__ import annotations

import numpy as np

#: the classes of the hemisphere stage
HEMISPHERE_LABELS = [[0, 'background'], [1, 'Left_cerebellum'], [2, 'Right_cerebellum']]


def read_lut(path) -> list[list]:
    """``[[index, name], ...]`` from a BIDS ``dseg.tsv`` lookup table (index 0 first)."""
    from cerebseg.utils.native import read_lut_tsv

    rows = [[r['index'], r['name']] for r in read_lut_tsv(path)]
    if not rows or rows[0][0] != 0:
        raise ValueError(f'{path}: a lookup table must start with index 0 (background)')
    return rows


def side(name: str) -> int:
    """-1 for a left label, +1 for a right one, 0 otherwise (midline, background)."""
    low = name.lower()
    if low.startswith(('left_', 'left-')):
        return -1
    if low.startswith(('right_', 'right-')):
        return 1
    return 0


def swap_classes(labels: list) -> np.ndarray:
    """Class permutation that mirrors left and right: ``perm[c]`` is the mirror class of ``c``.

    ``Left_X`` pairs with ``Right_X``; an unpaired lateral label is an error (the protocol could
    not be flipped for augmentation)."""
    names = [n for _, n in labels]
    where = {n.lower(): i for i, n in enumerate(names)}
    perm = np.arange(len(names))
    for i, name in enumerate(names):
        s = side(name)
        if s:
            stem = name[5:] if s < 0 else name[6:]
            mirror = ('right_' if s < 0 else 'left_') + stem.lower()
            if mirror not in where:
                raise ValueError(f'label {name!r} has no mirror label {mirror!r}')
            perm[i] = where[mirror]
    return perm


def class_index(dseg: np.ndarray, labels: list) -> np.ndarray:
    """Map protocol label values to class indices 0..L-1 (unknown values are an error)."""
    values = np.array([i for i, _ in labels])
    lut = np.full(int(max(values.max(), dseg.max())) + 1, -1, np.int16)
    lut[values] = np.arange(len(values))
    out = lut[dseg.astype(np.int64)]
    if (out < 0).any():
        bad = sorted(set(np.unique(dseg[out < 0]).tolist()))
        raise ValueError(f'label values {bad} are not in the lookup table')
    return out.astype(np.uint8)


def hemisphere_classes(classes: np.ndarray, labels: list, x_mm: np.ndarray) -> np.ndarray:
    """Background (0) / left (1) / right (2) cerebellum from class indices.

    ``x_mm`` gives the x coordinate (mm) of each voxel along the first axis; midline labels go
    to the side of x = 0 they lie on (x < 0: left)."""
    sides = np.array([side(n) for _, n in labels])
    lateral = sides[classes]
    left_x = (np.asarray(x_mm) < 0)[:, None, None]
    hemi = np.where(lateral < 0, 1, np.where(lateral > 0, 2, np.where(left_x, 1, 2)))
    return np.where(classes > 0, hemi, 0).astype(np.uint8)


def hemisphere_probs(probs: np.ndarray, labels: list, x_mm: np.ndarray) -> np.ndarray:
    """(3, X, Y, Z) background/left/right probabilities from per-class probabilities."""
    sides = np.array([side(n) for _, n in labels])
    left_x = (np.asarray(x_mm) < 0)[:, None, None]
    fg = probs[1:]
    s = sides[1:, None, None, None]
    left = (fg * (s < 0)).sum(0) + np.where(left_x, (fg * (s == 0)).sum(0), 0)
    right = (fg * (s > 0)).sum(0) + np.where(left_x, 0, (fg * (s == 0)).sum(0))
    return np.stack([probs[0], left, right]).astype(probs.dtype)
