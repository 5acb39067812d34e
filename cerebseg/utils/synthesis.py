"""Images synthesised from manual lobule label maps (for truth and library entries).

The CoBrALab manual maps (Park et al. 2014, CERES protocol) label each lobule's grey matter and
the white matter of its folia, the corpus medullare per side, and leave the CSF of the sulci and
of most fissures unlabelled. Their images are not public, so an image is synthesised from the
labels, in the spirit of SynthSeg (Billot et al. 2023): each voxel of a fine grid gets fractions
of three tissues,

* grey matter: lobule voxels within ``cortex_mm`` of the lobule's surface (unlabelled voxels,
  or a different lobule: a fissure has cortex on both banks); the corpus medullare has none;
* white matter: the corpus medullare and the lobule voxels deeper than that;
* CSF: unlabelled voxels inside the cerebellum's envelope (sulci, fissures, the fourth
  ventricle's recesses), plus a fraction ``fissure_csf`` of the voxels where two lobules touch
  (a fissure narrower than the labels' 0.3 mm voxels);

and an intensity is the fractions' mix of per-tissue levels. Outside the envelope the image is
NaN: the caller puts the rest of a head there. Plain NumPy/SciPy on arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: manual map values (1-13 left, 101-113 right: I-II, III, IV, V, VI, Crus I, Crus II, VIIB,
#: VIIIA, VIIIB, IX, X, corpus medullare) -> CERES (``cobra`` library) indices 1-26
MANUAL_TO_CERES = {**{k: k for k in range(1, 14)}, **{100 + k: 13 + k for k in range(1, 14)}}
#: the corpus medullare (white matter) in CERES indices, left and right
CERES_WHITE_MATTER = (13, 26)


@dataclass(frozen=True)
class TissueLevels:
    """Intensity of each tissue (any unit; the image is a mix of them)."""

    gm: float
    wm: float
    csf: float

    def as_array(self) -> np.ndarray:
        return np.array([self.gm, self.wm, self.csf], np.float32)


def ceres_from_manual(data: np.ndarray) -> np.ndarray:
    """Manual map values -> CERES indices (int16); anything else (a few stray voxels of other
    values in brain3) becomes 0."""
    data = np.asarray(data)
    if data.dtype.kind == 'u':   # integers as read: no float or int64 copy of a 0.3 mm map
        values = data
    else:
        values = np.clip(np.rint(data), 0, None).astype(np.int64)
    table = np.zeros(max(int(values.max(initial=0)), 113) + 1, np.int16)
    for src, dst in MANUAL_TO_CERES.items():
        table[src] = dst
    return table[values]


def envelope(labelled: np.ndarray, zooms, closing_mm: float = 2.0) -> np.ndarray:
    """The labelled region closed by a ball of ``closing_mm`` and its holes filled: the
    cerebellum with its sulci and fissures."""
    from scipy import ndimage

    outside = ndimage.distance_transform_edt(~labelled, sampling=zooms) > closing_mm
    closed = ndimage.distance_transform_edt(~outside, sampling=zooms) > closing_mm
    return ndimage.binary_fill_holes(closed | labelled)


def ceres_lobule(labels: np.ndarray) -> np.ndarray:
    """The lobule of each CERES index whatever its side (1-13; 0 background): the two halves
    of a lobule meet at the midline without a fissure (the vermis is one piece)."""
    labels = np.asarray(labels, np.int64)
    return np.where(labels > 0, (labels - 1) % 13 + 1, 0)


def lobule_interfaces(labels: np.ndarray, white_matter=CERES_WHITE_MATTER,
                      lobule_of=ceres_lobule) -> np.ndarray:
    """Voxels of a lobule with a 6-neighbour in a different lobule (the corpus medullare,
    unlabelled voxels and the same lobule of the other side do not count): the banks of
    fissures the labels leave no gap in."""
    lobule = (labels > 0) & ~np.isin(labels, white_matter)
    which = lobule_of(labels)
    out = np.zeros(labels.shape, bool)
    for axis in range(3):
        for shift in (1, -1):
            other = np.roll(which, shift, axis)
            other_lobule = np.roll(lobule, shift, axis)
            out |= lobule & other_lobule & (other != which)
    return out


def recede(labels: np.ndarray, zooms, mm: float, white_matter=CERES_WHITE_MATTER,
           lobule_of=ceres_lobule) -> np.ndarray:
    """Atrophy of a lobule map: every lobule voxel within ``mm`` of the surface that faces CSF
    (an unlabelled voxel, or the bank of a fissure the labels leave no gap in) unlabelled, so
    that the surface recedes and the sulci and fissures widen by twice ``mm``; the corpus
    medullare (``white_matter``) is kept, and with it the peduncles' border with the
    brainstem. Painted by :func:`tissue_fractions`, the unlabelled voxels become CSF."""
    from scipy import ndimage

    labels = np.asarray(labels)
    if mm <= 0:
        return labels.copy()
    zooms = tuple(float(z) for z in zooms)
    labelled = labels > 0
    banks = lobule_interfaces(labels, white_matter, lobule_of)
    # depth below the surface, from voxel centres: the surface lies half a voxel outside an
    # outer voxel's centre and half a voxel outside a bank voxel's (the fissure's middle)
    half = 0.5 * min(zooms)
    depth = np.minimum(ndimage.distance_transform_edt(labelled, sampling=zooms) - half,
                       ndimage.distance_transform_edt(~banks, sampling=zooms) + half)
    lobule = labelled & ~np.isin(labels, white_matter)
    gone = lobule & (depth < mm)
    out = labels.copy()
    out[gone] = 0
    return out


def tissue_fractions(labels: np.ndarray, zooms, cortex_mm: float = 1.0,
                     fissure_csf: float = 0.5, closing_mm: float = 2.0,
                     white_matter=CERES_WHITE_MATTER) -> tuple[np.ndarray, np.ndarray]:
    """Fractions (3, X, Y, Z) of grey matter, white matter and CSF of a lobule map, and the
    envelope (outside it the fractions are 0)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    zooms = tuple(float(z) for z in zooms)
    labelled = labels > 0
    inside = envelope(labelled, zooms, closing_mm)
    wm_label = np.isin(labels, white_matter)
    lobule = labelled & ~wm_label
    banks = lobule_interfaces(labels, white_matter)
    depth = ndimage.distance_transform_edt(~(~labelled | banks), sampling=zooms)
    gm = lobule & (depth <= cortex_mm)
    wm = wm_label | (lobule & ~gm)
    frac = np.zeros((3,) + labels.shape, np.float32)
    frac[0] = gm
    frac[1] = wm
    frac[2] = inside & ~labelled
    frac[0][banks] = 1.0 - fissure_csf
    frac[2][banks] = fissure_csf
    return frac, inside


def paint(fractions: np.ndarray, inside: np.ndarray, levels: TissueLevels) -> np.ndarray:
    """The image of tissue fractions: their mix of ``levels`` inside, NaN outside."""
    img = np.tensordot(levels.as_array(), fractions, axes=1).astype(np.float32)
    img[~inside] = np.nan
    return img


def remap_contrast(image: np.ndarray, source: TissueLevels, target: TissueLevels) -> np.ndarray:
    """Another contrast of the same anatomy, SynthSeg-style: the intensities piecewise linear
    through zero and the three tissue levels (``source`` -> ``target``), so that a voxel at a
    tissue's level gets the target's level of it and a mix of two neighbouring levels the mix
    of theirs; above the brightest source level the target of that level is kept (the
    template's fat and vessels are not modelled). Zero stays zero."""
    src = np.array([0.0, source.csf, source.gm, source.wm])
    dst = np.array([0.0, target.csf, target.gm, target.wm])
    order = np.argsort(src, kind='stable')
    if np.any(np.diff(src[order]) <= 0):
        raise ValueError(f'source levels must differ and be positive: {source}')
    return np.interp(np.asarray(image, np.float32), src[order], dst[order]).astype(np.float32)


def random_levels(rng, reference: TissueLevels, spread: float = 0.1) -> TissueLevels:
    """Levels drawn around ``reference``: each scaled by a factor in 1 +/- ``spread``, with the
    reference's order of grey matter between white matter and CSF kept."""
    gm, wm, csf = reference.as_array() * rng.uniform(1 - spread, 1 + spread, 3)
    lo, hi = min(wm, csf), max(wm, csf)
    gm = float(np.clip(gm, lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo)))
    return TissueLevels(gm=gm, wm=float(wm), csf=float(csf))
