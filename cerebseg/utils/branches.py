"""Lobule borders moved onto the subject's white-matter branches.

Each cerebellar lobule is a white-matter branch that leaves the corpus medullare, with the
folia it carries; the fissures that separate lobules run between branches. Label fusion
draws the borders where the registered anatomies put them, and on the real-anatomy cases of
``benchmarks/real_anatomy.py`` they miss the subject's fissures by up to a folium: on a branch
that carries five folia, one or two may carry the neighbouring lobule's label.

:func:`relabel_by_branches` reads the branches from the image and weighs the fused
probabilities by what each branch carries:

1. white matter is the part of the labelled cerebellum brighter than a level between the
   grey matter's and the corpus medullare's; the corpus medullare (and a margin around it)
   is taken out, so that what is left falls apart into branches;
2. at a series of rising levels the branches split further (a component tree); a component
   decides when the *unit* (a lobule, sides merged) that most of its voxels carry holds at
   least ``purity`` of them and its parts at the next level agree (less than ``minor`` of
   them carry another majority); otherwise its parts are decided on their own (the last
   level's and small components always decide). A deciding component's *shares* are the mean
   fused probability of each unit over its voxels;
3. every labelled lobule voxel within ``reach_mm`` of a white branch voxel takes the unit u
   that maximises ``p(u) * share(u) ** sharpness``, its own fused probability of u times the
   nearest branch's share of u (``sharpness`` 1.5). A branch that carries mostly one lobule
   pulls the voxels where the library's entries hesitated towards it; a branch split evenly
   changes nothing; a lobule that no entry proposed at a voxel is never given to it. The
   side, and which lobule of a unit of several (I-II, III and IV), come from the voxel's own
   label or, where the unit changed, from the nearest voxel labelled with that unit on that
   side.

With ``votes``, a second library that has not seen the subject's anatomy either (the CERES
library's lobule votes: the SUIT population atlas of 20 other people, its lobules mapped onto
the units) gives its unit probabilities, and both count in the shares and in each voxel's
own probability (``votes_weight``: half each). With two individual anatomies in the library,
their lobule proportions decide whole branches: on the real-anatomy case brain1 the fusion
gave most of branch after branch of the posterior lobe to the lobule above it (Crus I +19 %,
VIIIA -24 %, VIIIB -27 %); a population atlas's proportions correct most of that. Then a
lobule that only the votes proposed at a voxel can be given to it, never one that neither
library proposed.

The weighing is continuous: a small difference between two runs' fused probabilities (a
head and its mirror) moves the borders a little, where a hard rule (a branch takes its
majority lobule when that reaches 60 %) flipped whole branches: on the real-anatomy cases the
two gain about the same (``benchmarks/real_anatomy.py``), but the hard rule lost 0.027 of the
fusion's left-right mirror agreement on a real scan (``benchmarks/mirror.py``; README,
Accuracy, for the figures of this one).

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
#: the level above which a branch voxel counts as white matter (the voxels whose nearest one
#: within REACH_MM gives the shares)
WHITE_LEVEL = 0.5
#: share of a component's voxels that must carry its majority unit for it to decide (else its
#: parts at the next level do)
PURITY = 0.6
#: share of a component's parts (next level) carrying another majority that splits it
MINOR = 0.25
#: components smaller than this (voxels) decide, whatever their majority
MIN_VOXELS = 20
#: margin around the corpus medullare taken out of the branches (mm)
MARGIN_MM = 1.0
#: how far from a white branch voxel the relabelling reaches (mm)
REACH_MM = 2.0
#: how strongly a branch's shares weigh against a voxel's own fused probabilities: the voxel
#: takes the unit u maximising p(u) * share(u) ** SHARPNESS (module doc). Offline on the
#: real-anatomy and mirror runs (box, 0.5 mm) against a hard majority (+0.039 lobule Dice,
#: mirror agreement -0.026): 1 gains 0.031 and loses 0.002 (ds002748 sub-01) / 0.003 (sub-02);
#: 1.5 gains 0.035, loses 0.003 / 0.004; 2 gains 0.037, loses 0.005 / 0.005; 4 gains 0.039,
#: loses 0.008. End to end 2 left sub-02 at 0.9496 mirror agreement, under the 0.95 a default
#: needs
SHARPNESS = 1.5
#: below this contrast (corpus medullare - grey matter) / corpus medullare nothing changes
MIN_CONTRAST = 0.05
#: share of the unit probabilities that an independent library's votes weigh in with
#: (``votes``): the two libraries count as much as each other
VOTES_WEIGHT = 0.5


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


def _final_shares(image, unit, unit_probs, branches, levels, grey, white, purity, minor,
                  min_voxels, n_units):
    """Each branch voxel's share vector: the mean unit probability over the component of the
    tree (every level's components lie within ``branches``) that decides it, the largest whose
    majority is at least ``purity`` and whose parts at the next level agree (else its parts
    decide; the last level's and the small components always do).

    Returns ``(rows, table)``: ``rows`` an int array of the image's shape, -1 outside the
    branches; ``table[rows]`` the ``(n_units + 1)`` shares (column 0 unused)."""
    comps, majority, sizes, shares, parents, vectors = [], [], [], [], [], []
    for i, fraction in enumerate(levels):
        mask = branches & (image > grey + fraction * (white - grey))
        comp, n = ndi.label(mask)
        where = comp[mask]
        counts = np.zeros((n + 1, n_units + 1), np.int64)
        np.add.at(counts, (where, unit[mask]), 1)
        votes = counts[:, 1:]
        in_mask = unit_probs[:, mask[branches]]
        soft = np.zeros((n + 1, n_units + 1))
        for u in range(1, n_units + 1):
            soft[:, u] = np.bincount(where, in_mask[u], minlength=n + 1)
        vectors.append(soft / np.maximum(soft.sum(1, keepdims=True), 1e-12))
        comps.append(comp)
        majority.append(votes.argmax(1) + 1)
        sizes.append(counts.sum(1))
        shares.append(votes.max(1) / np.maximum(votes.sum(1), 1))
        if i:
            parent = np.zeros(n + 1, np.int64)
            parent[where] = comps[i - 1][mask]
            parents.append(parent)
    children = []
    for parent in parents:
        kids: dict[int, list[int]] = {}
        for child, p in enumerate(parent[1:], 1):
            kids.setdefault(int(p), []).append(child)
        children.append(kids)
    final = [np.zeros(len(m), bool) for m in majority]
    last = len(levels) - 1
    stack = [(0, j) for j in range(1, len(majority[0]))]
    while stack:
        i, j = stack.pop()
        if i == last or sizes[i][j] < min_voxels:
            final[i][j] = True
            continue
        kids = children[i].get(j, [])
        total = sum(sizes[i + 1][c] for c in kids)
        other = sum(sizes[i + 1][c] for c in kids if majority[i + 1][c] != majority[i][j])
        if shares[i][j] < purity or (total and other >= minor * total):
            stack.extend((i + 1, c) for c in kids)
        else:
            final[i][j] = True
    offsets = np.cumsum([0] + [len(v) for v in vectors])
    rows = np.full(image.shape, -1, np.int64)
    for i in range(len(levels)):    # final components never nest: one row per voxel
        hit = final[i][comps[i]] & (comps[i] > 0)
        rows[hit] = offsets[i] + comps[i][hit]
    return rows, np.concatenate(vectors)


def relabel_by_branches(image: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                        units, sides, zooms=(1, 1, 1), levels=LEVELS, purity: float = PURITY,
                        minor: float = MINOR, min_voxels: int = MIN_VOXELS,
                        margin_mm: float = MARGIN_MM, reach_mm: float = REACH_MM,
                        sharpness: float = SHARPNESS, votes: np.ndarray | None = None,
                        votes_weight: float = VOTES_WEIGHT) -> tuple[np.ndarray, dict]:
    """Labels whose lobule borders follow the image's white-matter branches (module doc).

    Parameters
    ----------
    image : (X, Y, Z) array
        Bias-corrected T1w on the labels' grid (white matter bright).
    labels : (X, Y, Z) int array
        Lobule labels (0 background).
    probabilities : (L, X, Y, Z) array
        The fused probability of every label value (uint8 as probability * 255, or floats in
        [0, 1]); a voxel can only take a lobule that has some probability there.
    units, sides : sequences indexed by label value
        ``units[l]``: the unit of label ``l`` (1, 2, ...: a lobule whatever its side; labels
        that share one, such as I-II, III and IV, form one unit); 0 for the background and
        the corpus medullare (white matter, never changed). ``sides[l]``: its side (any
        integers); a voxel keeps its side.
    zooms : voxel size (mm).
    votes : (U + 1, X, Y, Z) array or None
        Probabilities of each unit (row ``u``; row 0 unused) from a second, independent
        library (uint8 as probability * 255, or floats): a population atlas of another
        protocol whose lobules map onto the units. Where they sum to more than 0.05 they are
        normalised over the units and mixed into the unit probabilities, ``votes_weight``
        of them to ``1 - votes_weight`` of the fused ones, before the shares and the scores
        are taken; None: the fused probabilities alone.

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
    if probabilities.shape[1:] != labels.shape or probabilities.shape[0] > len(units):
        raise ValueError(f'Probabilities of shape {probabilities.shape} do not fit labels of '
                         f'shape {labels.shape} with {len(units)} values.')
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
    n_units = int(units.max())
    scale = 255.0 if probabilities.dtype == np.uint8 else 1.0
    # unit probabilities (sides merged) of the lobule voxels only
    unit_probs = np.zeros((n_units + 1, int(lobules.sum())), np.float32)
    for value in range(1, probabilities.shape[0]):
        if units[value] > 0:
            unit_probs[units[value]] += probabilities[value][lobules]
    unit_probs /= scale
    if votes is not None:
        if votes.shape[1:] != labels.shape or votes.shape[0] != n_units + 1:
            raise ValueError(f'Unit votes of shape {votes.shape} do not fit {n_units} units '
                             f'on labels of shape {labels.shape}.')
        extra = votes[:, lobules].astype(np.float32)
        extra[0] = 0.0
        extra /= 255.0 if votes.dtype == np.uint8 else 1.0
        total = extra.sum(0)
        extra = np.where(total > 0.05, extra / np.maximum(total, 1e-6), 0.0)
        unit_probs = (1.0 - votes_weight) * unit_probs + votes_weight * extra
        info['votes_weight'] = votes_weight
    margin = ndi.distance_transform_edt(~white_matter, sampling=zooms) <= margin_mm
    branches = lobules & ~margin
    rows, table = _final_shares(image, unit, unit_probs[:, branches[lobules]], branches,
                                levels, grey, white, purity, minor, min_voxels, n_units)
    white_branches = branches & (image > grey + WHITE_LEVEL * (white - grey)) & (rows >= 0)
    if not white_branches.any():
        return labels.astype(np.int16), info
    distance, nearest = ndi.distance_transform_edt(~white_branches, sampling=zooms,
                                                   return_indices=True)
    near = (distance <= reach_mm)[lobules]
    share = table[rows[tuple(i[lobules][near] for i in nearest)]].T     # (U + 1, N)
    score = unit_probs[:, near] * share ** sharpness
    score[0] = -1.0
    new_unit = unit.copy()
    moved = np.flatnonzero(lobules.ravel())[near]
    best = score.argmax(0)
    # no unit scores above 0 (the voxel's lobules all have no share in the nearest branch):
    # nothing to weigh, the voxel keeps its unit (an arg-max of zeros would give unit 1)
    idle = score[best, np.arange(best.size)] <= 0
    best[idle] = unit.ravel()[moved][idle]
    new_unit.ravel()[moved] = best
    changed = lobules & (new_unit != unit)
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
