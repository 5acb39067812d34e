"""Locally weighted majority voting (label fusion), NumPy implementation.

Method (Artaechevarria et al. 2009, "local weighted voting"): for atlas ``k`` at voxel ``x``

    MSD_k(x) = mean over channels c available for atlas k of
               mean over the (2r+1)^3 cube around x of (I_c(y) - A_kc(y))^2
    w_k(x)   = (MSD_k(x) + eps) ** -beta
    P_l(x)   = sum_k w_k(x) [L_k(x) == l] / sum_k w_k(x)

and the fused label is the ``l`` with the largest ``P_l``; ties go to the smallest label index
(``numpy.argmax`` keeps the first maximum).

With ``search = s > 0`` the vote is non-local (in the manner of Coupé et al. 2011's patch-based
segmentation, one patch per atlas): atlas ``k`` compares the subject's patch at ``x`` with its
own patches at ``x + d`` for every shift ``|d|_inf <= s``, keeps the best one (smallest MSD; the
unshifted patch on ties, then the first shift in C order) and votes that patch's centre label
``L_k(x + d)`` with the weight of that MSD. An atlas whose fissure lies a voxel off the
subject's thus votes where the subject's fissure is. An atlas searches only where its own patch
is defined (not exactly 0, :func:`searchable`); where that patch reaches beyond the edge of an
image cropped to the cerebellum, say, it votes its own patch's label. Indices are clamped at the
volume border (the shifted atlas is extended by its nearest voxel).

Intensities must be normalised alike (cerebseg maps
the 2nd and 98th foreground percentiles to 0 and 1). The cube mean at the volume border uses the
nearest-voxel extension (``scipy.ndimage.uniform_filter``'s ``mode='nearest'``).

:func:`weighted_majority_vote` runs the compiled Cython/OpenMP kernel (``_wmv.pyx``) when it
is built and falls back, with one warning, on its NumPy twin :func:`weighted_majority_vote_numpy`.
The two agree to float32 rounding (the kernel sums in double precision); labels are identical
except where the two best probabilities differ by less than that rounding. Where all atlases vote
the same label its probability is 1 whatever the weights: the kernel computes weights only where
they disagree (a few % of the working grid) and returns a compact :class:`LabelFusion` (the
probabilities of those voxels only); the twin computes everything in the box of the votes and
returns dense arrays.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

LOGGER = logging.getLogger('cerebseg.kernels.wmv')
_WARNED = []


def compiled_kernel():
    """The compiled kernel module, or None (logged once) when the extension is not built."""
    try:
        from cerebseg.kernels import _wmv
    except ImportError:
        if not _WARNED:
            LOGGER.warning('The compiled label-fusion kernel (cerebseg.kernels._wmv) is not '
                           'built; using the slower NumPy implementation. Reinstall cerebseg '
                           'with a C compiler (pip install .) to build it.')
            _WARNED.append(True)
        return None
    return _wmv


class LabelFusion(NamedTuple):
    """Fused labels, with the probabilities stored only where the atlases disagree.

    fused : (X, Y, Z) int16
    index : (M,) int64, flat (C-order) indices of the voxels where the K atlases do not all vote
        the same label, ascending
    probs : (M, L) float32, the label probabilities at those voxels (rows sum to 1)

    Everywhere else all atlases vote ``fused`` and its probability is exactly 1, the others 0.
    """

    fused: np.ndarray
    index: np.ndarray
    probs: np.ndarray

    @property
    def n_labels(self) -> int:
        return self.probs.shape[1]

    def dense(self) -> np.ndarray:
        """The (L, X, Y, Z) float32 probabilities (1 GB on the 0.5 mm working grid)."""
        out = np.zeros(self.fused.shape + (self.n_labels,), np.float32)
        _scatter(out, self.fused, self.index, self.probs, 1.0)
        return np.moveaxis(out, -1, 0)

    def probseg_uint8(self) -> np.ndarray:
        """(X, Y, Z, L) uint8 probabilities in 1/255 steps (rounded), labels last."""
        out = np.zeros(self.fused.shape + (self.n_labels,), np.uint8)
        _scatter(out, self.fused, self.index, np.rint(self.probs * 255), 255)
        return out

    @classmethod
    def from_dense(cls, labels, fused, probs, search: int = 0):
        """Compact form of a dense (L, X, Y, Z) result for the labels (K, X, Y, Z) voted."""
        index = np.flatnonzero(undecided(labels, search))
        flat = probs.reshape(probs.shape[0], -1)
        return cls(fused, index, np.ascontiguousarray(flat[:, index].T))


def _scatter(out, fused, index, values, one):
    flat = out.reshape(-1, out.shape[-1])
    flat[np.arange(fused.size), fused.reshape(-1)] = one
    flat[index] = values


def undecided(labels, search: int = 0, differ=None) -> np.ndarray:
    """(X, Y, Z) bool: the voxels where the candidate votes are not all the same label.

    Without search, where the K atlases do not all vote one label. With ``search = s``, where
    the K labels over the cube of shifts ``|d|_inf <= s`` around the voxel are not all one label:
    a disagreement within s voxels, or a label boundary of the (agreeing) atlases within s.
    Everywhere else the fused label is that one label, with probability 1. ``differ``: where
    the K atlases disagree, when the caller has it already (the kernel's scan).
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if differ is None:
        differ = (labels != labels[:1]).any(axis=0)
    if search <= 0:
        return differ
    size = 2 * int(search) + 1
    cube = np.ones((3, 3, 3), bool)
    near = ndimage.binary_dilation(differ, cube, iterations=int(search))
    edge = (ndimage.maximum_filter(labels[0], size, mode='nearest')
            != ndimage.minimum_filter(labels[0], size, mode='nearest'))
    return near | edge


def _shifts(search: int) -> list[tuple[int, int, int]]:
    """The shifts of the search cube: (0, 0, 0) first, then the others in C order."""
    rng = range(-search, search + 1)
    return [(0, 0, 0)] + [(a, b, c) for a in rng for b in rng for c in rng
                          if (a, b, c) != (0, 0, 0)]


def _shifted(volume, shift):
    """``volume[clamp(x + shift)]`` over the last three axes."""
    index = [np.clip(np.arange(n) + d, 0, n - 1) for n, d in zip(volume.shape[-3:], shift)]
    return volume[..., index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]


def _plane_boxes(mask):
    """Per x-plane count of ``mask`` and (ylo, yhi, zlo, zhi) box, as :func:`wmv_scan` gives."""
    count = mask.sum(axis=(1, 2)).astype(np.int64)
    bbox = np.zeros((mask.shape[0], 4), np.int32)
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    ny, nz = mask.shape[1:]
    for i in np.flatnonzero(count):
        y, z = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        bbox[i] = (y[0], y[-1] + 1, z[0], z[-1] + 1)
    bbox[count == 0] = (ny, 0, nz, 0)
    return count, bbox


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
                           num_threads: int = 1, use_compiled: bool | None = None,
                           search: int = 0, where_defined: bool = True) -> LabelFusion:
    """Fuse ``K`` warped label maps (compiled kernel when built, else the NumPy twin).

    Same parameters as :func:`weighted_majority_vote_numpy`, plus ``num_threads`` (OpenMP
    threads of the kernel) and ``use_compiled`` (None: whichever is available). Returns a
    :class:`LabelFusion`: the fused labels and the probabilities of the voxels where the atlases
    disagree (``.dense()`` gives the twin's (L, X, Y, Z) array).
    """
    wmv = compiled_kernel() if use_compiled in (None, True) else None
    if wmv is None:
        if use_compiled:
            raise ImportError('cerebseg.kernels._wmv is not built')
        fused, probs = weighted_majority_vote_numpy(labels, atlas_images, target, n_labels,
                                                    available, radius, beta, eps, search,
                                                    where_defined)
        return LabelFusion.from_dense(labels, fused, probs, search)
    labels = np.asarray(labels)
    # the kernel checks the range of int16 labels itself; other types must fit int16 first
    labels, atlas_images, target, available = _check(
        labels, atlas_images, target, available, None if labels.dtype == np.int16 else n_labels)
    labels = np.ascontiguousarray(labels, dtype=np.int16)
    shape = target.shape[1:]
    if labels.shape[0] == 0:  # no vote: background, like the twin
        return LabelFusion(np.zeros(shape, np.int16), np.empty(0, np.int64),
                           np.empty((0, n_labels), np.float32))
    threads = max(int(num_threads), 1)
    fused = np.empty(shape, dtype=np.int16)
    count = np.empty(shape[0], np.int64)
    bbox = np.empty((shape[0], 4), np.int32)
    bad = np.zeros(shape[0], np.uint8)
    wmv.wmv_scan(labels, fused, count, bbox, bad, int(n_labels), threads)
    if bad.any():
        raise ValueError(f'labels must lie in [0, {n_labels}); found '
                         f'[{labels.min()}, {labels.max()}]')
    search = int(search)
    if search > 0:
        mask = undecided(labels, search, differ=fused < 0)
        fused[mask] = -1
        count, bbox = _plane_boxes(mask)
    offset = np.zeros(shape[0] + 1, np.int64)
    np.cumsum(count, out=offset[1:])
    index = np.empty(int(offset[-1]), np.int64)
    probs = np.empty((index.size, n_labels), np.float32)
    if search > 0:
        atlas_images = np.ascontiguousarray(atlas_images, dtype=np.float32)
        wmv.wmv_fuse_search(
            labels, atlas_images, np.ascontiguousarray(target, dtype=np.float32),
            np.ascontiguousarray(available, dtype=np.uint8),
            searchable(atlas_images, available, radius, where_defined),
            fused, offset, bbox, index, probs,
            int(radius), search, float(beta), float(eps), threads)
        return LabelFusion(fused, index, probs)
    wmv.wmv_fuse(labels, np.ascontiguousarray(atlas_images, dtype=np.float32),
                 np.ascontiguousarray(target, dtype=np.float32),
                 np.ascontiguousarray(available, dtype=np.uint8), fused, offset, bbox, index,
                 probs, int(radius), float(beta), float(eps), threads)
    return LabelFusion(fused, index, probs)


def weighted_majority_vote_numpy(labels, atlas_images, target, n_labels: int, available=None,
                                 radius: int = 2, beta: float = 1.0, eps: float = 1e-3,
                                 search: int = 0, where_defined: bool = True):
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
    search : int
        Half-width (voxels) of the cube of patch shifts each atlas searches (0: local voting).
    where_defined : bool
        With ``search``: an atlas searches only where its image is defined around the voxel
        (:func:`searchable`), and elsewhere votes its unshifted patch.

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
    search = int(search)
    box = _vote_box(labels, radius + search)
    if box is None:
        return fused, probs
    if search > 0:
        allowed = searchable(atlas_images, available, radius, where_defined)
        return _search_vote(labels, atlas_images, target, n_labels, available, radius, beta,
                            eps, search, box, fused, probs, allowed)
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


def searchable(atlas_images, available, radius: int, where_defined: bool = True) -> np.ndarray:
    """(K, X, Y, Z) uint8: where atlas k may vote a shifted patch (1) or only its own (0).

    With ``where_defined``, an atlas searches only where its own patch at the voxel (the cube
    of half-width ``radius``, indices clamped) lies where its image is defined: some available
    channel is not exactly 0. A library entry cut from a larger image (a template cropped to
    the cerebellum, a skull-stripped head) is 0 beyond its edge; where its own patch reaches
    there, the intensity differences measure the crop, not the anatomy (any patch shifted
    inwards matches the subject's edge better than the entry's own, and the cerebellum grows),
    so the entry votes its own patch's label, as local voting does. A shifted patch that
    reaches undefined voxels needs no rule: it matches worse and loses. Without
    ``where_defined``, everywhere.
    """
    from scipy.ndimage import minimum_filter

    atlas_images = np.asarray(atlas_images)
    if atlas_images.ndim == 4:
        atlas_images = atlas_images[:, None]
    n_atlas = atlas_images.shape[0]
    shape = atlas_images.shape[2:]
    out = np.ones((n_atlas,) + shape, np.uint8)
    if not where_defined:
        return out
    available = (np.ones(atlas_images.shape[:2], bool) if available is None
                 else np.asarray(available, bool))
    size = 2 * int(radius) + 1
    for k in range(n_atlas):
        defined = (atlas_images[k, available[k]] != 0).any(axis=0)
        if not defined.all():
            out[k] = minimum_filter(defined.view(np.uint8), size=size, mode='nearest')
    return out


def _search_vote(labels, atlas_images, target, n_labels, available, radius, beta, eps, search,
                 box, fused, probs, allowed):
    """The non-local vote of :func:`weighted_majority_vote_numpy` inside ``box``."""
    from scipy.ndimage import uniform_filter

    sub_target = target[(slice(None),) + box]
    shape = sub_target.shape[1:]
    sub = np.zeros((n_labels,) + shape, dtype=np.float32)
    total = np.zeros(shape, np.float64)
    for k in range(labels.shape[0]):
        chans = np.flatnonzero(available[k])
        best = np.full(shape, np.inf)
        label = np.zeros(shape, np.int64)
        for shift in _shifts(search):
            msd = np.zeros(shape, np.float64)
            moved = _shifted(atlas_images[k], shift)[(slice(None),) + box]
            for c in chans:
                diff = (sub_target[c] - moved[c]).astype(np.float64)
                msd += uniform_filter(diff * diff, size=2 * radius + 1, mode='nearest')
            msd /= len(chans)
            better = msd < best
            if shift != (0, 0, 0):
                better &= allowed[k][box].astype(bool)
            best[better] = msd[better]
            label[better] = _shifted(labels[k], shift)[box][better]
        weight = (best + eps) ** (-beta)
        total += weight
        np.put_along_axis(sub, label[None], np.take_along_axis(sub, label[None], 0)
                          + weight[None].astype(np.float32), 0)
    sub /= total[None].astype(np.float32)
    probs[(slice(None),) + box] = sub
    fused[box] = np.argmax(sub, axis=0)
    return fused, probs


def _rows(fusion: LabelFusion, index: np.ndarray) -> np.ndarray:
    """(M, L) float32: the probabilities of ``fusion`` at the flat voxels ``index``."""
    rows = np.zeros((index.size, fusion.n_labels), np.float32)
    rows[np.arange(index.size), fusion.fused.reshape(-1)[index]] = 1.0
    at = np.searchsorted(index, fusion.index)
    rows[at] = fusion.probs
    return rows


def mix_fusions(local: LabelFusion, nonlocal_: LabelFusion, weight: float) -> LabelFusion:
    """``(1 - weight)`` times the local vote's probabilities plus ``weight`` times the
    non-local vote's, and the most probable label (ties: the smaller label index).

    Both must come from the same entries and subject (``search`` 0 and ``search > 0``): outside
    their undecided voxels both give the same label with probability 1, so only the union of
    those voxels is mixed. ``weight`` 0 gives the local vote, 1 the non-local one.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f'weight must lie in [0, 1]; got {weight}')
    if local.fused.shape != nonlocal_.fused.shape or local.n_labels != nonlocal_.n_labels:
        raise ValueError('the two fusions must share their grid and labels')
    index = np.union1d(local.index, nonlocal_.index).astype(np.int64)
    probs = (1.0 - weight) * _rows(local, index) + weight * _rows(nonlocal_, index)
    fused = local.fused.copy()
    fused.reshape(-1)[index] = probs.argmax(axis=1)
    return LabelFusion(fused, index, np.ascontiguousarray(probs, dtype=np.float32))


def match_levels(image, labels, target, white_labels, min_voxels: int = 100) -> np.ndarray:
    """An entry's warped T1w with its grey- and white-matter levels moved onto the subject's.

    The levels are medians over the entry's own warped labels: grey matter the labelled voxels
    whose label is not in ``white_labels``, white matter those whose label is. The intensities
    are mapped piecewise linearly through (0, 0), (entry grey, subject grey) and (entry white,
    subject white), extended linearly above: zero (outside the entry's image) stays zero, and
    an entry whose template has another grey/white contrast than the subject's (a smoother or
    differently scaled template) then compares with the subject on the same levels, so that
    neither the voting weights nor the non-local search prefer a patch for its brightness.
    Returned unchanged where either class has fewer than ``min_voxels`` voxels or a level is not
    positive and increasing from grey to white (not a T1w contrast).
    """
    image = np.asarray(image, np.float32)
    labels = np.asarray(labels)
    target = np.asarray(target, np.float32)
    white = np.isin(labels, np.asarray(list(white_labels), dtype=labels.dtype))
    grey = (labels > 0) & ~white
    if grey.sum() < min_voxels or white.sum() < min_voxels:
        return image
    ge, we = float(np.median(image[grey])), float(np.median(image[white]))
    gs, ws = float(np.median(target[grey])), float(np.median(target[white]))
    if not (0.0 < ge < we and 0.0 < gs < ws):
        return image
    low = image * (gs / ge)
    high = gs + (image - ge) * ((ws - gs) / (we - ge))
    return np.where(image <= ge, low, high).astype(np.float32)
