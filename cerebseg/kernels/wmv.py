"""Locally weighted majority voting (label fusion), NumPy implementation.

Method (Artaechevarria et al. 2009, "local weighted voting"): for atlas ``k`` at voxel ``x``

    MSD_k(x) = mean over channels c available for atlas k of
               mean over the (2r+1)^3 cube around x of (I_c(y) - A_kc(y))^2
    w_k(x)   = (MSD_k(x) + eps) ** -beta
    P_l(x)   = sum_k w_k(x) [L_k(x) == l] / sum_k w_k(x)

and the fused label is the ``l`` with the largest ``P_l``; ties go to the smallest label index
(``numpy.argmax`` keeps the first maximum). Intensities must be normalised alike (cerebseg maps
the 2nd and 98th foreground percentiles to 0 and 1). The cube mean at the volume border uses the
nearest-voxel extension (``scipy.ndimage.uniform_filter``'s ``mode='nearest'``).

:func:`weighted_majority_vote` runs the compiled Cython/OpenMP kernel (``_wmv.pyx``) when it
is built and falls back, with one warning, on its NumPy twin :func:`weighted_majority_vote_numpy`.
The two agree to float32 rounding (the kernel sums in double precision); labels are identical
except where the two best probabilities differ by less than that rounding.
"""
from __future__ import annotations

import logging

import numpy as np

LOGGER = logging.getLogger('cerebseg.kernels.wmv')
_WARNED = []


def compiled_kernel():
    """The compiled kernel, or None (logged once) when the extension is not built."""
    try:
        from cerebseg.kernels._wmv import wmv_kernel
    except ImportError:
        if not _WARNED:
            LOGGER.warning('The compiled label-fusion kernel (cerebseg.kernels._wmv) is not '
                           'built; using the slower NumPy implementation. Reinstall cerebseg '
                           'with a C compiler (pip install .) to build it.')
            _WARNED.append(True)
        return None
    return wmv_kernel


def _check(labels, atlas_images, target, available, n_labels=None):
    labels = np.asarray(labels)
    atlas_images = np.asarray(atlas_images, dtype=np.float32)
    target = np.asarray(target, dtype=np.float32)
    if target.ndim == 3:
        target = target[None]
    if atlas_images.ndim == 4:
        atlas_images = atlas_images[:, None]
    n_atlas, n_chan = atlas_images.shape[:2]
    if labels.shape != (n_atlas,) + target.shape[1:]:
        raise ValueError(f'labels has shape {labels.shape}; expected (K, X, Y, Z) = '
                         f'{(n_atlas,) + target.shape[1:]}')
    if atlas_images.shape[1:] != target.shape:
        raise ValueError(f'atlas_images has shape {atlas_images.shape}; expected (K, C, X, Y, Z) '
                         f'with (C, X, Y, Z) = {target.shape}')
    if available is None:
        available = np.ones((n_atlas, n_chan), dtype=bool)
    available = np.asarray(available, dtype=bool)
    if available.shape != (n_atlas, n_chan) or not available.any(axis=1).all():
        raise ValueError('available must be (K, C) with at least one channel per atlas')
    if n_labels is not None and labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f'labels must lie in [0, {n_labels}); found '
                         f'[{labels.min()}, {labels.max()}]')
    return labels, atlas_images, target, available


def local_weights(atlas_images, target, available=None, radius: int = 2, beta: float = 1.0,
                  eps: float = 1e-3) -> np.ndarray:
    """Per-atlas voting weights ``(K, X, Y, Z)`` float32 (see the module docstring)."""
    from scipy.ndimage import uniform_filter

    dummy = np.zeros((np.shape(atlas_images)[0],) + np.shape(target)[-3:], np.int16)
    _, atlas_images, target, available = _check(dummy, atlas_images, target, available)
    n_atlas = atlas_images.shape[0]
    weights = np.empty((n_atlas,) + target.shape[1:], dtype=np.float32)
    for k in range(n_atlas):
        msd = np.zeros(target.shape[1:], dtype=np.float32)
        chans = np.flatnonzero(available[k])
        for c in chans:
            diff = target[c] - atlas_images[k, c]
            msd += uniform_filter(diff * diff, size=2 * radius + 1, mode='nearest')
        msd /= len(chans)
        weights[k] = (msd + eps) ** (-beta)
    return weights


def _vote_box(labels, radius):
    """Bounding box of the voxels where some atlas votes for a label, grown by the radius."""
    voted = np.argwhere(labels.any(axis=0))
    if voted.size == 0:
        return None
    shape = labels.shape[1:]
    lo = np.maximum(voted.min(axis=0) - radius - 1, 0)
    hi = np.minimum(voted.max(axis=0) + radius + 2, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def weighted_majority_vote(labels, atlas_images, target, n_labels: int, available=None,
                           radius: int = 2, beta: float = 1.0, eps: float = 1e-3,
                           num_threads: int = 1, use_compiled: bool | None = None):
    """Fuse ``K`` warped label maps (compiled kernel when built, else the NumPy twin).

    Same parameters and returns as :func:`weighted_majority_vote_numpy`, plus ``num_threads``
    (OpenMP threads of the kernel) and ``use_compiled`` (None: whichever is available). The
    kernel's probabilities come as a (L, X, Y, Z) view of a labels-last array, so
    ``np.moveaxis(probs, 0, -1)`` is contiguous.
    """
    kernel = compiled_kernel() if use_compiled in (None, True) else None
    if kernel is None:
        if use_compiled:
            raise ImportError('cerebseg.kernels._wmv is not built')
        return weighted_majority_vote_numpy(labels, atlas_images, target, n_labels, available,
                                            radius, beta, eps)
    labels, atlas_images, target, available = _check(labels, atlas_images, target, available,
                                                     n_labels)
    shape = target.shape[1:]
    fused = np.zeros(shape, dtype=np.int16)
    probs = np.zeros(shape + (n_labels,), dtype=np.float32)  # labels last for the kernel
    probs[..., 0] = 1.0
    box = _vote_box(labels, radius)
    if box is None:
        return fused, np.moveaxis(probs, -1, 0)
    kernel(np.ascontiguousarray(labels, dtype=np.int16),
           np.ascontiguousarray(atlas_images, dtype=np.float32),
           np.ascontiguousarray(target, dtype=np.float32),
           np.ascontiguousarray(available, dtype=np.uint8), fused, probs,
           int(radius), float(beta), float(eps), max(int(num_threads), 1),
           box[0].start, box[0].stop, box[1].start, box[1].stop, box[2].start, box[2].stop)
    return fused, np.moveaxis(probs, -1, 0)


def weighted_majority_vote_numpy(labels, atlas_images, target, n_labels: int, available=None,
                                 radius: int = 2, beta: float = 1.0, eps: float = 1e-3):
    """Fuse ``K`` warped label maps (NumPy reference implementation).

    Parameters
    ----------
    labels : (K, X, Y, Z) int
        Warped atlas label maps, values in ``[0, n_labels)`` (0 = background).
    atlas_images : (K, X, Y, Z) or (K, C, X, Y, Z) float
        Warped atlas intensities (C channels, e.g. T1w and T2w).
    target : (X, Y, Z) or (C, X, Y, Z) float
        Subject intensities, normalised like the atlases.
    n_labels : int
        Number of labels including background.
    available : (K, C) bool, optional
        Which channels each atlas has (an atlas without T2w votes on T1w alone).

    Returns
    -------
    fused : (X, Y, Z) int16
    probabilities : (n_labels, X, Y, Z) float32, summing to 1 over labels.
    """
    labels, atlas_images, target, available = _check(labels, atlas_images, target, available,
                                                     n_labels)
    shape = target.shape[1:]
    fused = np.zeros(shape, dtype=np.int16)
    probs = np.zeros((n_labels,) + shape, dtype=np.float32)
    probs[0] = 1.0
    # Where every atlas says background the answer is background whatever the weights: compute
    # only inside the bounding box of the votes, grown by the patch radius.
    box = _vote_box(labels, radius)
    if box is None:
        return fused, probs
    weights = local_weights(atlas_images[(slice(None), slice(None)) + box],
                            target[(slice(None),) + box], available, radius, beta, eps)
    total = weights.sum(axis=0)
    sub = np.zeros((n_labels,) + total.shape, dtype=np.float32)
    flat_sub = sub.reshape(-1)
    index = np.arange(total.size)
    for k in range(labels.shape[0]):
        # each voxel gets one vote per atlas, so the scattered indices are unique
        flat_sub[labels[k][box].reshape(-1).astype(np.int64) * total.size + index] += \
            weights[k].reshape(-1)
    sub /= total[None]
    probs[(slice(None),) + box] = sub
    fused[box] = np.argmax(sub, axis=0)
    return fused, probs
