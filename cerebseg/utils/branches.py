"""Lobule borders moved onto the subject's white-matter branches.

Each cerebellar lobule is a white-matter branch that leaves the corpus medullare, with the
folia it carries; the fissures that separate lobules run between branches. Label fusion
draws the borders where the registered anatomies put them, and on the real-anatomy cases of
``benchmarks/real_anatomy.py`` they miss the subject's fissures by up to a folium: on a branch
that carries five folia, one or two may carry the neighbouring lobule's label.

:func:`relabel_by_branches` reads the branches from the image and gives each the label that
most of it carries:

1. white matter is the part of the labelled cerebellum brighter than a level between the
   grey matter's and the corpus medullare's; the corpus medullare (and a margin around it)
   is taken out, so that what is left falls apart into branches;
2. at a series of rising levels the branches split further (a component tree); a component
   takes the *unit* (a lobule, sides merged) that most of its voxels carry when that majority
   is at least ``purity`` and its parts at the next level agree (less than ``minor`` of them
   carry another majority); otherwise its parts are decided on their own, and a part that is
   never decided keeps its labels;
3. every other labelled voxel within ``reach_mm`` of a decided branch voxel takes the unit of
   the nearest one, unless the library's entries agreed on its label (``agreement``); the
   side, and which lobule of a unit of several (I-II, III and IV), come from the voxel's own
   label or, where the unit changed, from the nearest voxel labelled with that unit on that
   side.

The outline, the corpus medullare and everything outside the labels are left as they are:
only which lobule a voxel belongs to changes. Plain NumPy/SciPy on arrays; the image must
show white matter brighter than grey matter (a T1w), else nothing changes.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: white-matter levels, as fractions of the way from the grey matter's to the corpus
#: medullare's median intensity (rising: each level's components split the previous ones)
LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: the level above which a branch voxel counts as white matter (undecided ones keep their unit)
WHITE_LEVEL = 0.5
#: share of a component's voxels that must carry its majority unit
PURITY = 0.6
#: share of a component's parts (next level) carrying another majority that splits it
MINOR = 0.25
#: components smaller than this (voxels) are decided by their own majority, not split
MIN_VOXELS = 20
#: margin around the corpus medullare taken out of the branches (mm)
MARGIN_MM = 1.0
#: how far from a decided branch voxel the relabelling reaches (mm)
REACH_MM = 2.0
#: where the fused probability of a voxel's label reaches this (the library's entries agree on
#: it) the label stays: measured on the CERES template cases, whose smooth template shows no
#: resolved branches (changes everywhere: lobular Dice -0.015; only where the entries
#: disagree: -0.002), and on the real-anatomy cases (+0.043 and +0.039 lobule Dice)
AGREED = 0.99
#: below this contrast (corpus medullare - grey matter) / corpus medullare nothing changes
MIN_CONTRAST = 0.05


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mass = np.cumsum(hist * centres)
    between = (mass[-1] * weight / weight[-1] - mass) ** 2 / np.maximum(
        weight * (weight[-1] - weight), 1)
    return float(centres[np.argmax(between)])


def branch_levels(image: np.ndarray, lobules: np.ndarray,
                  white_matter: np.ndarray) -> tuple[float, float]:
    """Grey-matter and corpus-medullare intensity levels: the median of the lobule voxels
    darker than their two-class (Otsu) threshold, and the median of the corpus medullare."""
    values = image[lobules]
    grey = float(np.median(values[values < _otsu(values)]))
    return grey, float(np.median(image[white_matter]))


def _component_units(image, unit, branches, levels, grey, white, purity, minor, min_voxels,
                     n_units):
    """Unit (0: undecided or not a branch) of every voxel from the component tree of the
    levels (every level's components lie within ``branches``)."""
    comps, majority, sizes, shares, parents = [], [], [], [], []
    for i, fraction in enumerate(levels):
        mask = branches & (image > grey + fraction * (white - grey))
        comp, n = ndi.label(mask)
        counts = np.zeros((n + 1, n_units + 1), np.int64)
        np.add.at(counts, (comp[mask], unit[mask]), 1)
        votes = counts[:, 1:]
        comps.append(comp)
        majority.append(votes.argmax(1) + 1)
        sizes.append(counts.sum(1))
        shares.append(votes.max(1) / np.maximum(votes.sum(1), 1))
        if i:
            parent = np.zeros(n + 1, np.int64)
            parent[comp[mask]] = comps[i - 1][mask]
            parents.append(parent)
    children = []
    for parent in parents:
        kids: dict[int, list[int]] = {}
        for child, p in enumerate(parent[1:], 1):
            kids.setdefault(int(p), []).append(child)
        children.append(kids)
    decided = [np.zeros(len(m), np.int16) for m in majority]
    last = len(levels) - 1
    stack = [(0, j) for j in range(1, len(majority[0]))]
    while stack:
        i, j = stack.pop()
        if i == last or sizes[i][j] < min_voxels:
            if shares[i][j] >= purity:
                decided[i][j] = majority[i][j]
            continue
        kids = children[i].get(j, [])
        total = sum(sizes[i + 1][c] for c in kids)
        other = sum(sizes[i + 1][c] for c in kids if majority[i + 1][c] != majority[i][j])
        if shares[i][j] < purity or (total and other >= minor * total):
            stack.extend((i + 1, c) for c in kids)
        else:
            decided[i][j] = majority[i][j]
    out = np.zeros(image.shape, np.int16)
    for i in range(last, -1, -1):   # the largest decided component containing a voxel wins
        value = decided[i][comps[i]]
        out = np.where(value > 0, value, out)
    return out


def relabel_by_branches(image: np.ndarray, labels: np.ndarray, units, sides, zooms=(1, 1, 1),
                        levels=LEVELS, purity: float = PURITY, minor: float = MINOR,
                        min_voxels: int = MIN_VOXELS, margin_mm: float = MARGIN_MM,
                        reach_mm: float = REACH_MM, agreement=None,
                        agreed: float = AGREED) -> tuple[np.ndarray, dict]:
    """Labels whose lobule borders follow the image's white-matter branches (module doc).

    Parameters
    ----------
    image : (X, Y, Z) array
        Bias-corrected T1w on the labels' grid (white matter bright).
    labels : (X, Y, Z) int array
        Lobule labels (0 background).
    units, sides : sequences indexed by label value
        ``units[l]``: the unit of label ``l`` (1, 2, ...: a lobule whatever its side; labels
        that share one, such as I-II, III and IV, form one unit); 0 for the background and
        the corpus medullare (white matter, never changed). ``sides[l]``: its side (any
        integers); a voxel keeps its side.
    zooms : voxel size (mm).
    agreement : (X, Y, Z) array or None
        The fused probability of each voxel's label; where it is ``agreed`` or more (the
        library's entries agree) the label stays.

    Returns
    -------
    labels : int16 array, the same outline
    info : dict
        ``grey_level``, ``white_level``, ``changed_voxels`` (and ``skipped`` with the reason
        when nothing could change).
    """
    labels = np.asarray(labels)
    image = np.asarray(image, np.float32)
    units = np.asarray(units, np.int64)
    sides = np.asarray(sides, np.int64)
    top = int(labels.max(initial=0))
    if top >= len(units):
        raise ValueError(f'Label {top} has no unit (the protocol gives {len(units)} values).')
    unit = units[labels]
    labelled = labels > 0
    lobules = labelled & (unit > 0)
    white_matter = labelled & (unit == 0)
    info: dict = {'changed_voxels': 0}
    if lobules.sum() < 100 or white_matter.sum() < 100:
        info['skipped'] = 'too few lobule or corpus medullare voxels'
        return labels.astype(np.int16), info
    grey, white = branch_levels(image, lobules, white_matter)
    info.update(grey_level=round(grey, 4), white_level=round(white, 4))
    if not white > grey or (white - grey) / abs(white) < MIN_CONTRAST:
        info['skipped'] = 'the corpus medullare is not brighter than the grey matter'
        return labels.astype(np.int16), info
    zooms = np.asarray(zooms, float)[:3]
    margin = ndi.distance_transform_edt(~white_matter, sampling=zooms) <= margin_mm
    branches = lobules & ~margin
    decided = _component_units(image, unit, branches, levels, grey, white, purity, minor,
                               min_voxels, int(units.max()))
    white_branches = branches & (image > grey + WHITE_LEVEL * (white - grey))
    # undecided white branch voxels keep their unit; grey matter is decided by its neighbours
    decided = np.where(white_branches, np.where(decided > 0, decided, unit), 0)
    distance, nearest = ndi.distance_transform_edt(decided == 0, sampling=zooms,
                                                   return_indices=True)
    new_unit = decided[tuple(nearest)]
    changed = lobules & (distance <= reach_mm) & (new_unit != unit)
    if agreement is not None:
        changed &= np.asarray(agreement) < agreed
    out = labels.astype(np.int16).copy()
    if changed.any():
        side = sides[labels]
        for u in np.unique(new_unit[changed]):
            for s in np.unique(side[changed & (new_unit == u)]):
                where = changed & (new_unit == u) & (side == s)
                candidates = np.flatnonzero((units == u) & (sides == s))
                if candidates.size == 1:
                    out[where] = candidates[0]
                    continue
                source = np.isin(labels, candidates) if candidates.size else unit == u
                if not source.any():
                    source = unit == u
                idx = ndi.distance_transform_edt(~source, sampling=zooms,
                                                 return_distances=False, return_indices=True)
                out[where] = labels[tuple(i[where] for i in idx)]
    info['changed_voxels'] = int((out != labels).sum())
    return out, info


def swap_probabilities(probs: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Probabilities ``(L, X, Y, Z)`` whose most probable label is ``after`` where it differs
    from ``before`` (the old most probable label): the two labels' probabilities swap, so the
    background's, and every other, stay as they were."""
    out = probs.copy()
    where = np.nonzero(before != after)
    old = before[where].astype(np.int64)
    new = after[where].astype(np.int64)
    p_old = probs[(old,) + where]
    p_new = probs[(new,) + where]
    out[(old,) + where] = p_new
    out[(new,) + where] = p_old
    return out
