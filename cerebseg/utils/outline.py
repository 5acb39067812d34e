"""The outline of a labelled structure decided by the subject's own image.

Label fusion draws the cerebellum's outline where the registered templates put it, on a grid
coarser than the partial-volume layer that the image shows: on the native grid, the voxels of
the outline that are more cerebrospinal fluid than tissue end up labelled (measured on the
real-anatomy cases of ``benchmarks/real_anatomy.py``: almost every falsely labelled voxel lies
within one voxel of the true outline, its T1w intensity 0.35-0.5 of the way from CSF to
tissue). :func:`trim_outline` takes them out: a voxel of the labels' outline whose intensity
lies below the midpoint between the subject's CSF and its labelled tissue holds less than half
tissue, so it is background. Only the one-voxel outer layer is judged; interior voxels and the
boundary with other tissue (the peduncles, which border the brainstem at tissue intensity) keep
their labels; nothing is added.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: where between the CSF (0) and tissue (1) levels an outline voxel becomes background
TISSUE_FRACTION = 0.5
#: below this contrast (tissue - CSF) / tissue the image cannot separate them: nothing changes
MIN_CONTRAST = 0.2
#: width of the shell outside the labels where the CSF level is measured (voxels)
RING_VOXELS = 3


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


def trim_outline(labels: np.ndarray, image: np.ndarray, *,
                 fraction: float = TISSUE_FRACTION) -> tuple[np.ndarray, dict]:
    """Labels without the voxels of their outer layer that are more CSF than tissue.

    ``labels``: integer label map (0 background) on the grid of ``image`` (a bias-corrected
    T1w: CSF darker than tissue). A labelled voxel with a background face neighbour whose
    intensity is below ``csf + fraction * (tissue - csf)`` (:func:`outline_levels`) becomes
    background. Returns the new labels and what was done: the levels, the threshold, the
    voxels removed (``skipped`` names the reason when nothing could be judged).
    """
    if labels.shape != image.shape:
        raise ValueError(f'labels {labels.shape} and image {image.shape} differ in shape')
    inside = labels > 0
    info = {'fraction': fraction, 'removed_voxels': 0}
    if not inside.any():
        return labels, dict(info, skipped='no labels')
    csf, tissue = outline_levels(image, inside)
    info.update(csf_level=round(csf, 3), tissue_level=round(tissue, 3))
    if tissue <= 0 or (tissue - csf) / tissue < MIN_CONTRAST:
        return labels, dict(info, skipped=f'CSF ({csf:.4g}) and tissue ({tissue:.4g}) too '
                                          'close to tell apart')
    threshold = csf + fraction * (tissue - csf)
    outline = inside & ndi.binary_dilation(~inside)
    remove = outline & (image < threshold)
    out = labels.copy()
    out[remove] = 0
    info.update(threshold=round(threshold, 3), removed_voxels=int(remove.sum()),
                outline_voxels=int(outline.sum()))
    return out, info
