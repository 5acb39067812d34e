"""Manual lobule maps put into a whole-head template: real individual anatomy with an image.

The CoBrALab manual maps (Park et al. 2014; 0.3 mm, CERES protocol, each in its subject's own
head space) come without their images. :func:`place_in_template` gives one a head:

1. the map's cerebellum is put into MNI152NLin2009cAsym by a similarity transform (rotation,
   shift, one scale: the map keeps its own shape) of its mask onto the template's cerebellum
   (the CoBra atlas);
2. the template is bent (ANTs SyN at 2 mm of the template's cerebellar mask onto the map's)
   so that its posterior fossa, brainstem and occipital lobes fit around the map's cerebellum;
3. the labels are carried, by nearest neighbour, onto a 0.3 mm grid in template axes.

:func:`detail_image` then paints the cerebellum from the labels
(:mod:`cerebseg.utils.synthesis`) over the bent template; where the bent template still has
cerebellum outside the map's envelope, CSF. The pair (bent head at 1 mm, painted detail at
0.3 mm) is the source of exact-truth cases (:func:`cerebseg.utils.truth.make_case`) and of the
library entries made from the maps.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from cerebseg.utils.images import ants_to_nib, nib_to_ants
from cerebseg.utils.synthesis import (
    TissueLevels,
    ceres_from_manual,
    paint,
    remap_contrast,
    tissue_fractions,
)

LOGGER = logging.getLogger('cerebseg.assets.manual')

#: the MNI152NLin2009cAsym head as shipped: three-class medians inside its brain mask (what
#: :func:`t2w_head` maps from)
HEAD_LEVELS = TissueLevels(gm=716.0, wm=996.0, csf=306.0)
#: tissue levels that paint a cerebellum like that head's (:data:`HEAD_LEVELS`; the corpus
#: medullare of CoBra reads 1044): the painted cerebellum of a library entry matches the
#: template around it
TEMPLATE_LEVELS = TissueLevels(gm=716.0, wm=1040.0, csf=250.0)
#: T2w levels of the synthesised cases (CSF brightest, grey above white matter; relative, as in
#: a 3 T turbo spin echo) on the T1w's scale
T2W_LEVELS = TissueLevels(gm=560.0, wm=400.0, csf=1000.0)
DETAIL_SPACING = 0.3
DETAIL_MARGIN_MM = 8.0


@dataclass
class Placed:
    """A manual map in template space: the bent head, the labels and the template's bent
    cerebellar mask (on the labels' grid)."""

    head: nib.Nifti1Image           # template head bent to the map's outline (template grid)
    labels: nib.Nifti1Image         # CERES indices, DETAIL_SPACING mm, template axes
    template_cerebellum: np.ndarray  # bool on the labels' grid
    similarity: list                # ANTs transform parameters (for the record)
    scale: float                    # template size / the map's own size (linear)


def read_manual_map(path: str | Path, margin_mm: float = 6.0) -> nib.Nifti1Image:
    """A manual map (MINC2 or NIfTI) as CERES indices (int16), cropped to its labels plus
    ``margin_mm``."""
    img = nib.load(str(path))
    data = ceres_from_manual(_voxel_values(img, path))
    labelled = data > 0
    if not labelled.any():
        raise ValueError(f'{path}: no lobule labels (values 1-13, 101-113)')
    # bounds per axis from projections (an index array of the 0.3 mm map costs seconds)
    spans = [np.flatnonzero(labelled.any(axis=tuple(a for a in range(3) if a != ax)))
             for ax in range(3)]
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    pad = np.ceil(margin_mm / zooms).astype(int)
    lo = np.maximum(np.array([s[0] for s in spans]) - pad, 0)
    hi = np.minimum(np.array([s[-1] for s in spans]) + pad + 1, data.shape)
    crop = data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    out = nib.Nifti1Image(np.ascontiguousarray(crop), affine)
    out.header.set_data_dtype(np.int16)
    return out


def _voxel_values(img, path) -> np.ndarray:
    """The image's values. A MINC2 file of integers whose one scaling is the identity (the
    manual maps: uint8, valid range and image range both 0-255) is read as its integers by
    h5py, in the axis order nibabel gives and its affine describes: nibabel scales it to float64
    slice by slice (10-60 s and 1.4 GB for a 0.3 mm map, against 0.3 s)."""
    if isinstance(img, nib.minc2.Minc2Image):
        import h5py

        with h5py.File(path, 'r') as f:
            group = f['minc-2.0/image/0']
            image = group['image']
            kind = image.dtype.kind
            if kind in 'iu' and image.shape == img.shape and {'image-min', 'image-max'} \
                    <= set(group):
                info = np.iinfo(image.dtype)
                valid = image.attrs.get('valid_range', (info.min, info.max))
                scaling = (group['image-min'][()], group['image-max'][()])
                if all(np.ndim(v) == 0 for v in scaling) and np.allclose(scaling, valid):
                    return image[()]
    return np.asarray(img.dataobj)


def _smooth_mask(aimg, sigma_mm: float = 1.0):
    import ants

    return ants.smooth_image(aimg, sigma_mm, sigma_in_physical_coordinates=True)


def place_in_template(labels: nib.Nifti1Image, template_head: nib.Nifti1Image,
                      template_labels: nib.Nifti1Image, seed: int = 0,
                      spacing: float = DETAIL_SPACING) -> Placed:
    """Put a manual map (:func:`read_manual_map`) into the template (see the module); its
    labels on a ``spacing`` mm grid (the maps' own 0.3 mm by default; tests use 0.5 mm, which
    keeps the sulci that the labels leave unlabelled and costs a fifth of the painting)."""
    import ants

    from cerebseg.utils.registration import ants_seed

    head = nib_to_ants(template_head)
    tpl_mask = ants.resample_image_to_target(
        nib_to_ants(nib.Nifti1Image((np.asarray(template_labels.dataobj) > 0)
                                    .astype(np.float32), template_labels.affine)),
        head, 'linear')
    fixed = _smooth_mask(tpl_mask)
    man = nib_to_ants(nib.Nifti1Image((np.asarray(labels.dataobj) > 0).astype(np.float32),
                                      labels.affine))
    man = _smooth_mask(man, 0.5)
    moving = ants.resample_image(man, (1.0, 1.0, 1.0), False, 0)
    with ants_seed(seed), tempfile.TemporaryDirectory() as tmp:
        sim = ants.registration(fixed, moving, type_of_transform='Similarity',
                                aff_metric='meansquares', outprefix=f'{tmp}/sim_')
        params = ants.read_transform(sim['fwdtransforms'][0]).parameters.tolist()
        # the transform maps template points to the map's: its scale is map / template
        scale = (abs(np.linalg.det(np.reshape(params[:9], (3, 3)))) ** (-1 / 3)
                 if len(params) == 12 else 1.0 / params[6])
        # the labels on a fine grid in template axes around the template's cerebellum
        ref = _detail_reference(template_labels, spacing)
        fine = ants.apply_transforms(nib_to_ants(ref), nib_to_ants(labels),
                                     sim['fwdtransforms'], interpolator='nearestNeighbor')
        fine_labels = np.rint(fine.numpy()).astype(np.int16)
        # the map's outline on the template grid; the template bent onto it at 2 mm (the
        # surroundings need the shape, not the folia)
        placed_mask = ants.apply_transforms(head, man, sim['fwdtransforms'])
        two = (2.0, 2.0, 2.0)
        syn = ants.registration(ants.resample_image(_smooth_mask(placed_mask), two, False, 0),
                                ants.resample_image(fixed, two, False, 0),
                                type_of_transform='SyNOnly', initial_transform='identity',
                                syn_metric='meansquares', reg_iterations=(60, 40, 20),
                                outprefix=f'{tmp}/syn_')
        bent = ants.apply_transforms(head, head, syn['fwdtransforms'], interpolator='linear')
        bent_mask = ants.apply_transforms(fine, tpl_mask, syn['fwdtransforms'],
                                          interpolator='linear')
        dice = _dice(placed_mask.numpy() > 0.5, ants.apply_transforms(
            head, tpl_mask, syn['fwdtransforms']).numpy() > 0.5)
    LOGGER.info('Manual map placed: scaled x%.3f into the template; the template cerebellum '
                'bent onto it, Dice %.3f', scale, dice)
    out_labels = nib.Nifti1Image(fine_labels, ref.affine)
    out_labels.header.set_data_dtype(np.int16)
    return Placed(head=ants_to_nib(bent, np.float32), labels=out_labels,
                  template_cerebellum=bent_mask.numpy() > 0.5, similarity=params,
                  scale=float(scale))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _detail_reference(template_labels: nib.Nifti1Image,
                      spacing: float = DETAIL_SPACING) -> nib.Nifti1Image:
    """An empty image on a ``spacing`` mm grid (template axes) that holds the template's
    cerebellum plus DETAIL_MARGIN_MM."""
    data = np.asarray(template_labels.dataobj) > 0
    nz = np.argwhere(data)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)
    vox = nz.min(0) + corners * (nz.max(0) - nz.min(0))
    world = vox @ template_labels.affine[:3, :3].T + template_labels.affine[:3, 3]
    lo = world.min(0) - DETAIL_MARGIN_MM
    hi = world.max(0) + DETAIL_MARGIN_MM
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing) + 1)
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = lo
    return nib.Nifti1Image(np.zeros(shape, np.float32), affine)


def detail_image(placed: Placed, levels: TissueLevels = TEMPLATE_LEVELS,
                 cortex_mm: float = 1.0, fissure_csf: float = 0.5,
                 base: nib.Nifti1Image | None = None) -> nib.Nifti1Image:
    """The painted cerebellum on the labels' grid, over ``base`` (default: the bent head)
    read there: inside the envelope the tissues' mix, in the rest of the template's bent
    cerebellum CSF, elsewhere the base."""
    from scipy import ndimage

    labels = np.asarray(placed.labels.dataobj)
    zooms = placed.labels.header.get_zooms()[:3]
    frac, inside = tissue_fractions(labels, zooms, cortex_mm=cortex_mm, fissure_csf=fissure_csf)
    img = paint(frac, inside, levels)
    del frac
    base = placed.head if base is None else base
    to_base = np.linalg.inv(base.affine) @ placed.labels.affine
    vox = np.indices(labels.shape, np.float32).reshape(3, -1)
    coords = to_base[:3, :3] @ vox + to_base[:3, 3:4]
    under = ndimage.map_coordinates(np.asarray(base.dataobj, np.float32), coords, order=1,
                                    mode='nearest').reshape(labels.shape)
    fill = np.where(placed.template_cerebellum, np.float32(levels.csf), under)
    img = np.where(inside, img, fill).astype(np.float32)
    return nib.Nifti1Image(img, placed.labels.affine)


def t2w_head(placed: Placed, levels: TissueLevels) -> nib.Nifti1Image:
    """The bent template head in a T2w-like contrast (:func:`remap_contrast` of its T1w from
    :data:`HEAD_LEVELS` to ``levels``): MNI152NLin2009cAsym comes without a T2w."""
    data = np.asarray(placed.head.dataobj, np.float32)
    return nib.Nifti1Image(remap_contrast(data, HEAD_LEVELS, levels), placed.head.affine)


def manual_case(placed: Placed, seed: int, supersample: int = 3, t2w: bool = False,
                recede_mm: float = 0.0):
    """An exact-truth case of real anatomy (:func:`cerebseg.utils.truth.make_case`) from a
    placed manual map: its cerebellum painted with tissue levels drawn around the template's
    (10 %), a cortical thickness of 0.8-1.3 mm and a CSF share of 0.2-0.8 in the fissures the
    labels leave no gap in, scaled back to the map's own size (x 0.9-1.1), then the case's
    random transform, grid, bias, contrast and noise. ``t2w``: a T2w of the same anatomy too
    (levels drawn around :data:`T2W_LEVELS`, the head around the cerebellum by
    :func:`t2w_head`, its own native grid, bias and noise); the T1w is the same as without it.
    ``recede_mm``: atrophy (:func:`cerebseg.utils.synthesis.recede`: the surface and the
    fissures' banks receding by that much, CSF in their place) with everything else drawn as
    without it, so that only the anatomy changes. Returns the case and what was drawn."""
    import dataclasses

    from cerebseg.utils.synthesis import random_levels, recede
    from cerebseg.utils.truth import CaseSpec, make_case

    if recede_mm > 0:
        receded = recede(np.asarray(placed.labels.dataobj), placed.labels.header.get_zooms()[:3],
                         recede_mm)
        placed = dataclasses.replace(placed, labels=nib.Nifti1Image(receded,
                                                                    placed.labels.affine))

    rng = np.random.default_rng([seed, 22])
    levels = random_levels(rng, TEMPLATE_LEVELS)
    cortex_mm, fissure_csf = float(rng.uniform(0.8, 1.3)), float(rng.uniform(0.2, 0.8))
    detail = detail_image(placed, levels, cortex_mm=cortex_mm, fissure_csf=fissure_csf)
    spec = CaseSpec(scale_range=(0.9 / placed.scale, 1.1 / placed.scale),
                    supersample=supersample)
    drawn = {'levels': [levels.gm, levels.wm, levels.csf], 'cortex_mm': cortex_mm,
             'fissure_csf': fissure_csf, 'scale_to_template': placed.scale,
             'recede_mm': float(recede_mm)}
    t2_sources = None
    if t2w:
        levels2 = random_levels(np.random.default_rng([seed, 22, 2]), T2W_LEVELS)
        head2 = t2w_head(placed, levels2)
        t2_sources = [detail_image(placed, levels2, cortex_mm=cortex_mm,
                                   fissure_csf=fissure_csf, base=head2), head2]
        drawn['t2w_levels'] = [levels2.gm, levels2.wm, levels2.csf]
    case = make_case([detail, placed.head], placed.labels, seed=seed,
                     n_labels=int(np.asarray(placed.labels.dataobj).max()) + 1, spec=spec,
                     t2w=t2_sources)
    return case, drawn
