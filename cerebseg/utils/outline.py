"""The outline of a labelled structure decided by the subject's own image.

Label fusion draws the cerebellum's outline where the registered templates put it, on a grid
coarser than the partial-volume layer that the image shows: on the native grid, the voxels of
the outline that are more cerebrospinal fluid than tissue end up labelled (measured on the
real-anatomy cases of ``benchmarks/real_anatomy.py``: almost every falsely labelled voxel lies
within one voxel of the true outline, its T1w intensity 0.35-0.5 of the way from CSF to
tissue). :func:`trim_outline` takes them out: a voxel of the labels' outline whose intensity
lies below the midpoint between the subject's CSF and its labelled tissue holds less than half
tissue, so it is background. The outer layer is judged again after each removal, up to
``TRIM_DEPTH_MM`` deep (:func:`trim_passes`): the excess is a shell of one to three voxels
(with the manual library on brain2, 5.6 mL falsely labelled, 99.9 % of it within 2 mm of the
true outline, all round and in the mouths of the sulci; one pass left 4 % of excess volume,
three passes 2.9 %). Only dark voxels reached from outside through dark voxels go: an interior
dark voxel, and the boundary with other tissue (the peduncles, which border the brainstem at
tissue intensity), keep their labels; nothing is added by it.

The fusion also leaves out voxels of the partial-volume layer that hold more tissue than CSF:
with a library of the other manual maps only, the trimmed cerebellum was 3.3 % too small on
average (up to 4.8 %; most of the missing voxels within 1 mm inside the true outline, their T1w
0.55-0.8 of the way from CSF to tissue, where some entries but not most put the cerebellum).
:func:`grow_outline` adds them: a voxel just outside the labels, brighter than the same
midpoint, facing CSF (a face neighbour outside the labels below the midpoint), where the fused
probability of the structure is at least ``SUPPORT``. One layer only, and never across a
boundary with other tissue: a voxel between the labels and the brainstem has no dark
neighbour. :func:`tissue_outline` does both.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from cerebseg.utils.reports import crop_box

#: where between the CSF (0) and tissue (1) levels an outline voxel becomes background
TISSUE_FRACTION = 0.5
#: below this contrast (tissue - CSF) / tissue the image cannot separate them: nothing changes
MIN_CONTRAST = 0.2
#: width of the shell outside the labels where the CSF level is measured (voxels)
RING_VOXELS = 3
#: how deep :func:`trim_outline` may go from the fused outline, in mm (three passes on a 1 mm
#: grid: chosen on the three leave-one-map-out cases of ``benchmarks/real_anatomy.py``)
TRIM_DEPTH_MM = 3.0
#: the least fused probability of the structure (all its labels together) at a voxel that
#: :func:`grow_outline` may add: the entries must have proposed it there
SUPPORT = 0.25


def outline_levels(image: np.ndarray, inside: np.ndarray,
                   ring_voxels: int = RING_VOXELS) -> tuple[float, float]:
    """CSF and tissue intensity levels around a labelled structure.

    Tissue: the median intensity inside. CSF: the darker of two classes (two-means) of the
    non-zero voxels in a shell of ``ring_voxels`` around it, which holds CSF, dura and bone
    as well as the neighbouring tissue (zeros, outside a skull-stripped brain, are left out).
    """
    tissue = float(np.median(image[inside]))
    ring = ndi.binary_dilation(inside, iterations=ring_voxels) & ~inside
    values = image[ring]
    values = values[values > 0]
    if values.size == 0:
        return tissue, tissue
    dark, bright = float(np.percentile(values, 10)), tissue
    for _ in range(50):
        is_dark = np.abs(values - dark) < np.abs(values - bright)
        if not is_dark.any() or is_dark.all():
            break
        new = float(values[is_dark].mean()), float(values[~is_dark].mean())
        if new == (dark, bright):
            break
        dark, bright = new
    return dark, tissue


def _midpoint(csf: float, tissue: float, fraction: float) -> tuple[float | None, str]:
    """The intensity ``fraction`` of the way from ``csf`` to ``tissue``, or None and the reason
    when the image cannot tell them apart (contrast below ``MIN_CONTRAST``)."""
    if tissue <= 0 or (tissue - csf) / tissue < MIN_CONTRAST:
        return None, f'CSF ({csf:.4g}) and tissue ({tissue:.4g}) too close to tell apart'
    return csf + fraction * (tissue - csf), ''


def trim_passes(zooms, depth_mm: float = TRIM_DEPTH_MM) -> int:
    """How many layers :func:`trim_outline` judges on a grid of voxel sizes ``zooms`` (mm):
    ``depth_mm`` over their geometric mean, rounded, at least one."""
    size = float(np.prod(np.asarray(zooms, float)[:3])) ** (1 / 3)
    if not size > 0:
        raise ValueError(f'voxel sizes {tuple(zooms)} must be positive')
    return max(1, int(round(depth_mm / size)))


def trim_outline(labels: np.ndarray, image: np.ndarray, *,
                 levels: tuple[float, float] | None = None,
                 fraction: float = TISSUE_FRACTION,
                 passes: int = round(TRIM_DEPTH_MM)) -> tuple[np.ndarray, dict]:
    """Labels without the voxels of their outer layers that are more CSF than tissue.

    ``labels``: integer label map (0 background) on the grid of ``image`` (a bias-corrected
    T1w: CSF darker than tissue). A labelled voxel with a background face neighbour whose
    intensity is below ``csf + fraction * (tissue - csf)`` becomes background; the new outer
    layer is judged the same way, ``passes`` times in all (a dark voxel goes only when a chain
    of dark voxels joins it to the background; default: ``TRIM_DEPTH_MM`` of 1 mm voxels, see
    :func:`trim_passes`). ``levels``: (csf, tissue) to use (default:
    :func:`outline_levels` of ``labels``, measured once). Returns the new labels and what was
    done: the levels, the threshold, the voxels removed in all and by each pass (``skipped``
    names the reason when nothing could be judged).
    """
    if labels.shape != image.shape:
        raise ValueError(f'labels {labels.shape} and image {image.shape} differ in shape')
    if passes < 1:
        raise ValueError(f'passes={passes}: at least one layer is judged')
    inside = labels > 0
    info = {'fraction': fraction, 'removed_voxels': 0, 'passes': passes}
    if not inside.any():
        return labels, dict(info, skipped='no labels')
    csf, tissue = levels if levels is not None else outline_levels(image, inside)
    info.update(csf_level=round(csf, 3), tissue_level=round(tissue, 3))
    threshold, why = _midpoint(csf, tissue, fraction)
    if threshold is None:
        return labels, dict(info, skipped=why)
    # the labels' bounding box, one voxel wider on each side: nothing outside it changes
    box = crop_box(inside, 1)
    ins, dark = inside[box].copy(), image[box] < threshold
    by_pass, first_outline = [], None
    for _ in range(passes):
        outline = ins & ndi.binary_dilation(~ins)
        if first_outline is None:
            first_outline = int(outline.sum())
        remove = outline & dark
        if not remove.any():
            break
        ins &= ~remove
        by_pass.append(int(remove.sum()))
    out = labels.copy()
    out[box][~ins] = 0
    info.update(threshold=round(threshold, 3), removed_voxels=int(sum(by_pass)),
                removed_by_pass=by_pass, outline_voxels=first_outline)
    return out, info


def grow_outline(labels: np.ndarray, image: np.ndarray, foreground: np.ndarray, *,
                 levels: tuple[float, float] | None = None, fraction: float = TISSUE_FRACTION,
                 support: float = SUPPORT) -> tuple[np.ndarray, dict]:
    """Labels with the voxels just outside them that are more tissue than CSF.

    ``foreground``: the fused probability of the structure (all labels together, 0-1) on the
    grid of ``labels``. A background voxel with a face neighbour in the labels is added when
    its intensity is at least ``csf + fraction * (tissue - csf)``, it has a face neighbour
    outside the labels below that level (it lies between the labels and CSF, not between
    them and other tissue), and ``foreground >= support``. It takes the label of the nearest
    labelled voxel. ``levels``: (csf, tissue) to use (default: :func:`outline_levels` of
    ``labels``). Returns the new labels and what was done (``added_voxels``; ``skipped``
    names the reason when nothing could be judged).
    """
    if not labels.shape == image.shape == foreground.shape:
        raise ValueError(f'labels {labels.shape}, image {image.shape} and foreground '
                         f'{foreground.shape} differ in shape')
    inside = labels > 0
    info = {'support': support, 'added_voxels': 0}
    if not inside.any():
        return labels, dict(info, skipped='no labels')
    csf, tissue = levels if levels is not None else outline_levels(image, inside)
    threshold, why = _midpoint(csf, tissue, fraction)
    if threshold is None:
        return labels, dict(info, skipped=why)
    # work on the labels' bounding box, one voxel wider on each side (plus one for the
    # dark-neighbour test)
    box = crop_box(inside, 2)
    ins, img, fg = inside[box], image[box], foreground[box]
    dark = (img < threshold) & ~ins
    add = (~ins & ndi.binary_dilation(ins) & (img >= threshold) & (fg >= support)
           & ndi.binary_dilation(dark))
    out = labels.copy()
    if add.any():
        nearest = ndi.distance_transform_edt(~ins, return_distances=False,
                                             return_indices=True)
        out[box][add] = labels[box][tuple(i[add] for i in nearest)]
    return out, dict(info, added_voxels=int(add.sum()), threshold=round(threshold, 3))


def tissue_outline(labels: np.ndarray, image: np.ndarray, foreground: np.ndarray, *,
                   fraction: float = TISSUE_FRACTION, support: float = SUPPORT,
                   passes: int = round(TRIM_DEPTH_MM)) -> tuple[np.ndarray, dict]:
    """The outline decided by the image on both sides: :func:`trim_outline` (``passes``
    layers), then :func:`grow_outline` of what is left, both with the CSF and tissue levels of
    ``labels`` (a trimmed voxel, below the midpoint, is never added back). Returns the labels
    and the two reports merged (``removed_voxels``, ``added_voxels``)."""
    if not labels.shape == image.shape == foreground.shape:
        raise ValueError(f'labels {labels.shape}, image {image.shape} and foreground '
                         f'{foreground.shape} differ in shape')
    levels = outline_levels(image, labels > 0) if (labels > 0).any() else None
    trimmed, info = trim_outline(labels, image, levels=levels, fraction=fraction, passes=passes)
    if 'skipped' in info:
        return trimmed, dict(info, support=support, added_voxels=0)
    grown, more = grow_outline(trimmed, image, foreground, fraction=fraction, support=support,
                               levels=levels)
    return grown, dict(info, support=support, added_voxels=more['added_voxels'])
