"""Registration with ANTs (antspyx) as plain functions on ANTsImages.

Every function returns transform files (ANTs ``.mat`` / ``.nii.gz`` warps) so that outputs can be
carried back to native space exactly.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cerebseg.utils.images import WORLD_MIRROR as _MIRROR
from cerebseg.utils.preproc import masked_correlation

LOGGER = logging.getLogger('cerebseg.utils.registration')

#: below this correlation (inside the template brain mask) between the affinely registered
#: subject and the MNI template, the fit is taken as failed: the input is not a human brain
#: or the registration did not converge. Measured: real T1w 0.45-0.60 (IXI002 0.60,
#: ds002748 sub-01 0.53, whole-head "chris" 0.45), a failed fit of a real head 0.13-0.16,
#: the non-brain phantom 0.05.
MIN_TEMPLATE_CORRELATION = 0.25


def ants_random_seed(seed: int) -> int:
    """The ``--random-seed`` given to antsRegistration for cerebseg's ``seed``.

    antsRegistration takes a seed of 0 as "no seed" and seeds from the clock (which made
    cerebseg's default ``--random-seed 0`` irreproducible), so seeds are shifted to 1, 2, ...
    """
    return int(seed) % (2 ** 31 - 1) + 1


@contextmanager
def ants_seed(seed: int | None):
    """Make ANTs' random sampling reproducible within the block (antspyx keeps a global)."""
    import ants.config

    previous = ants.config._random_seed
    ants.config._random_seed = None if seed is None else ants_random_seed(seed)
    try:
        yield
    finally:
        ants.config._random_seed = previous


def set_itk_environment(threads: int) -> None:
    """Process-wide ITK settings for reproducible results, made before the first ITK filter.

    ITK's default ("Pool") threader hands the pieces of an image to its threads as they
    become free, so filters that sum over pieces (ANTs' non-local means denoising, N4) give
    results that change with the load of the machine: the same T2w denoised three times in
    one process gave three different images. The "Platform" threader splits the image the
    same way every time: results depend on the thread count only.
    """
    os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(max(int(threads), 1))
    os.environ['ITK_GLOBAL_DEFAULT_THREADER'] = 'Platform'


def set_threads(n: int) -> None:
    """ITK thread count for the ANTs calls that follow in this process.

    ITK reads it once, at its first filter in the process: later calls have no effect there
    (:mod:`cerebseg.utils.isolate` runs work that needs its own count in a fresh process)."""
    os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(max(int(n), 1))


def identity_transform(path: str) -> str:
    """Write an identity affine to ``path`` (an ANTs initial transform) and return the path.

    Used where both images already lie in MNI-like coordinates, so that ANTs does not start
    from the centres of mass (a cropped cerebellum template and a whole head differ there).
    """
    import ants

    ants.write_transform(ants.create_ants_transform('AffineTransform', dimension=3), path)
    return path


def _keep(paths: list[str], out_prefix: str) -> list[str]:
    """Move ANTs' temporary transform files to ``out_prefix`` + their own suffix."""
    kept = []
    for i, src in enumerate(paths):
        ext = '.mat' if src.endswith('.mat') else '.nii.gz'
        dst = f'{out_prefix}{i}{ext}'
        shutil.copyfile(src, dst)
        kept.append(dst)
    return kept


@dataclass
class AffineFit:
    transform: str
    correlation: float
    candidate: str
    #: for a mirror-averaged fit, how far apart the scan's and its mirror's fits were (mm)
    mirror_distance_mm: float | None = None


#: the two starts of :func:`affine_to_template`, in order of preference on a tie
AFFINE_STARTS = ('TRSAA', 'Affine')
#: the one start of a coarse fit (``--affine-fit coarse``, on 4 mm copies: 3 s instead of 30 s
#: on one thread; on ds002748 sub-01 1.1 mm from the default's best start at the corners of the
#: posterior fossa, where the two default starts are 0.9 mm apart)
COARSE_AFFINE_START = 'Affine'


def affine_start(moving, target, brain_mask: np.ndarray, candidate: str, out_prefix: str,
                 seed: int | None = 0, spacing: float = 2.0) -> AffineFit:
    """One start of :func:`affine_to_template`: ANTs ``candidate`` (``'TRSAA'``: translation,
    rigid, similarity, affine; ``'Affine'``: affine directly) on ``spacing`` mm copies of
    ``moving`` and ``target``, scored by the correlation of the warped full-resolution image
    with ``target`` inside ``brain_mask``. The transform is written to ``out_prefix`` + ``0.mat``.
    """
    import ants

    fixed_lo = ants.resample_image(target, (spacing,) * 3, False, 0)
    moving_lo = ants.resample_image(moving, (spacing,) * 3, False, 0)
    with ants_seed(seed), tempfile.TemporaryDirectory() as tmp:
        reg = ants.registration(fixed_lo, moving_lo, type_of_transform=candidate,
                                outprefix=f'{tmp}/{candidate}_')
        warped = ants.apply_transforms(target, moving, reg['fwdtransforms'])
        corr = masked_correlation(warped.numpy(), target.numpy(), brain_mask)
        LOGGER.info('Affine start %s: correlation with the template %.3f', candidate, corr)
        kept = _keep(reg['fwdtransforms'][:1], out_prefix)
    return AffineFit(transform=kept[0], correlation=corr, candidate=candidate)


def best_affine(fits: list[AffineFit]) -> AffineFit:
    """The start that correlates best (the first of :data:`AFFINE_STARTS` on a tie)."""
    order = {name: i for i, name in enumerate(AFFINE_STARTS)}
    return max(sorted(fits, key=lambda f: order[f.candidate]), key=lambda f: f.correlation)


#: corners of a box around cerebellum and brainstem in MNI152NLin2009cAsym (LPS mm), where two
#: fits of one scan are compared
_FOSSA_CORNERS_LPS = np.array([[-x, -y, z, 1.0] for x in (-60.0, 60.0) for y in (-100.0, -15.0)
                               for z in (-75.0, 5.0)])
#: a scan's fit and its mirror's fit (mirrored back) further apart than this (mm, at the corners
#: of the posterior fossa) are not averaged: one of them went wrong, and the one that correlates
#: better with the template is kept. Measured on ds002748 sub-01..04 and their mirrors: 0.2-1.0 mm
MIRROR_FIT_TOLERANCE_MM = 6.0


def read_affine(path: str) -> np.ndarray:
    """An ANTs affine ``.mat`` as a 4 x 4 matrix on LPS points (template point -> moving point)."""
    import ants

    tx = ants.read_transform(path)
    params = np.asarray(tx.parameters, dtype=float)
    centre = np.asarray(tx.fixed_parameters, dtype=float)
    linear = params[:9].reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = params[9:12] + centre - linear @ centre
    return matrix


def write_affine(matrix: np.ndarray, path: str) -> str:
    """Write a 4 x 4 LPS matrix (template point -> moving point) as an ANTs affine ``.mat``."""
    import ants

    tx = ants.create_ants_transform(transform_type='AffineTransform', dimension=3,
                                    matrix=np.asarray(matrix, float)[:3, :3],
                                    offset=np.asarray(matrix, float)[:3, 3])
    ants.write_transform(tx, path)
    return path


def mirror_conjugate(matrix: np.ndarray) -> np.ndarray:
    """The transform of a scan's world mirror, from the scan's own (onto a symmetric template):
    ``F @ matrix @ F`` with F the mirror about x = 0. Its own inverse."""
    return _MIRROR @ np.asarray(matrix, float) @ _MIRROR


def fit_distance_mm(a: np.ndarray, b: np.ndarray) -> float:
    """The largest distance (mm) between where two transforms take the posterior fossa's
    corners."""
    return float(np.abs((np.asarray(a) - np.asarray(b)) @ _FOSSA_CORNERS_LPS.T)[:3].max())


def mirror_ants(image):
    """An ANTsImage mirrored about the world plane x = 0 by its header: the same voxels."""
    import ants

    flip = _MIRROR[:3, :3]
    return ants.from_numpy(image.numpy(), origin=tuple(flip @ np.asarray(image.origin)),
                           spacing=tuple(image.spacing),
                           direction=flip @ np.asarray(image.direction))


def _mirror_pair(direct: str, mirrored: str) -> tuple[np.ndarray, np.ndarray, float]:
    """A scan's affine, its mirror's affine mirrored back, and how far apart they are (mm)."""
    a, b = read_affine(direct), mirror_conjugate(read_affine(mirrored))
    return a, b, fit_distance_mm(a, b)


def combine_mirror_fits(direct: AffineFit, mirrored: AffineFit, out_path: str) -> AffineFit:
    """One mirror-equivariant affine from a scan's fit (``direct``) and its world mirror's fit
    (``mirrored``, :func:`mirror_ants`), both onto a template that is its own mirror.

    ``mirror_conjugate(mirrored)`` estimates the same transform as ``direct``; their mean is
    written to ``out_path``. The scan's mirror gets exactly the mirrored transform (the two fits
    swap roles), so left and right are treated alike whatever ANTs' sampling and local optima
    do: a single fit of a scan and of its mirror differ by up to 1 mm in the posterior fossa.
    Two fits further apart than :data:`MIRROR_FIT_TOLERANCE_MM` are not averaged; the one that
    correlates better is kept (a warning says so). The correlation returned is the mean of the
    two fits' (or the kept one's).
    """
    a, b, distance = _mirror_pair(direct.transform, mirrored.transform)
    if distance <= MIRROR_FIT_TOLERANCE_MM:
        matrix = 0.5 * (a + b)
        corr = 0.5 * (direct.correlation + mirrored.correlation)
    else:
        keep_direct = direct.correlation >= mirrored.correlation
        LOGGER.warning('The affine fits of the T1w and of its mirror differ by %.1f mm in the '
                       'posterior fossa (usually under 1 mm); the %s fit, which correlates better '
                       'with the template (%.3f against %.3f), is kept alone.', distance,
                       'direct' if keep_direct else 'mirrored',
                       max(direct.correlation, mirrored.correlation),
                       min(direct.correlation, mirrored.correlation))
        matrix, corr = (a, direct.correlation) if keep_direct else (b, mirrored.correlation)
    LOGGER.info('Affine of the T1w and of its mirror: %.2f mm apart in the posterior fossa',
                distance)
    write_affine(matrix, out_path)
    return AffineFit(transform=out_path, correlation=corr, candidate=direct.candidate,
                     mirror_distance_mm=distance)


def affine_to_template(moving, template_head, template_brain, brain_mask: np.ndarray,
                       skull_stripped: bool, out_prefix: str, seed: int | None = 0,
                       spacing: float = 2.0, symmetric: bool = True) -> AffineFit:
    """Affine registration of a T1w to MNI152NLin2009cAsym, robust to whole-head and brain inputs.

    Two starts (:data:`AFFINE_STARTS`, :func:`affine_start`) run on ``spacing`` mm copies of
    both images; the one whose warped full-resolution image correlates best with the template
    inside ``brain_mask`` wins. Skull-stripped inputs are registered to the brain-extracted
    template, whole heads to the whole-head template. With ``symmetric`` (the default; the
    target must then be its own mirror, :func:`cerebseg.utils.images.mirror_average`) the
    world mirror of ``moving`` is fitted the same way and the two fits are averaged
    (:func:`combine_mirror_fits`): a mirrored input gets exactly the mirrored transform. (The
    pipeline runs the starts in child processes, two at once:
    :class:`cerebseg.interfaces.preproc.MNIAffine`.)

    Returns the transform (moving -> template, ANTs convention: it maps template points into
    the moving image) and the correlation used for quality control.
    """
    target = template_brain if skull_stripped else template_head
    final = f'{out_prefix}0.mat'
    sources = {'': moving, 'mirror_': mirror_ants(moving)} if symmetric else {'': moving}
    best = {tag: best_affine([affine_start(image, target, brain_mask, candidate,
                                           f'{out_prefix}{tag}{candidate}_', seed=seed,
                                           spacing=spacing) for candidate in AFFINE_STARTS])
            for tag, image in sources.items()}
    if symmetric:
        return combine_mirror_fits(best[''], best['mirror_'], final)
    shutil.copyfile(best[''].transform, final)
    return AffineFit(transform=final, correlation=best[''].correlation,
                     candidate=best[''].candidate)


def refine_to_box(moving, template, label_maps: list[np.ndarray], grid, initial: str,
                  out_prefix: str, margin_mm: float = 5.0, seed: int | None = 0,
                  mirrored: bool = False):
    """Refine a whole-brain affine (``initial``, moving -> template) on the posterior fossa.

    The fit runs on the 1 mm copy of the working box ``grid`` (a :class:`BoxGrid`), with the MNI
    ``template`` (whole head or brain, as the input), inside the union of ``label_maps`` (the
    library's labels on the working grid) and of its mirror, dilated by ``margin_mm``. The
    library entries are placed in the box by an affine fitted to cerebellum and brainstem; a
    subject placed by its whole-brain fit can differ from them in scale by 10-30 % in the box (a
    whole head more than a brain: the skull and scalp weigh in), and the nonlinear step does not
    undo all of it (issue 9: whole head and skull-stripped copies of one T1w differed by 16 % in
    cerebellar volume, within 2 % with this refinement). With ``mirrored`` the world mirror of
    ``moving`` is refined instead, from the mirrored ``initial`` (the second half of a
    mirror-equivariant refinement: :func:`average_mirror_fits`). Returns the transform file.
    """
    import ants
    import nibabel as nib
    from scipy import ndimage

    from cerebseg.utils.images import mirror_on_grid, nib_to_ants

    union = np.any(np.stack([np.asarray(m) > 0 for m in label_maps]), axis=0)
    union |= mirror_on_grid(union.astype(np.uint8), grid.affine, order=0) > 0
    union = ndimage.binary_dilation(union, iterations=max(round(margin_mm / grid.spacing), 1))
    box1 = grid.reference(1.0)
    region = ants.resample_image_to_target(
        nib_to_ants(nib.Nifti1Image(union.astype(np.float32), grid.affine)), box1,
        'nearestNeighbor')
    target = ants.resample_image_to_target(template, box1, 'linear')
    with ants_seed(seed), tempfile.TemporaryDirectory() as tmp:
        if mirrored:
            moving = mirror_ants(moving)
            initial = write_affine(mirror_conjugate(read_affine(initial)), f'{tmp}/mirror.mat')
        reg = ants.registration(target, moving, type_of_transform='Affine',
                                initial_transform=initial, mask=region, outprefix=f'{tmp}/box_')
        return _keep(reg['fwdtransforms'][:1], out_prefix)[0]


def average_mirror_fits(direct: str, mirrored: str, out_path: str) -> float:
    """Write the mean of a scan's affine (``direct``) and of its world mirror's affine mirrored
    back (``mirrored``) to ``out_path``; return how far apart they were (mm, posterior fossa).
    Both must be fits onto a template that is its own mirror (see :func:`combine_mirror_fits`)."""
    a, b, distance = _mirror_pair(direct, mirrored)
    write_affine(0.5 * (a + b), out_path)
    return distance


def rigid_to(fixed, moving, out_prefix: str, seed: int | None = 0, spacing: float = 2.0):
    """Rigid registration (Mattes MI, at ``spacing`` mm) of ``moving`` onto ``fixed``.

    Returns the transform file and a quality figure: the Pearson correlation of the gradient
    magnitudes of ``fixed`` and of the registered ``moving`` inside the foreground of
    ``fixed``. Edges coincide whatever the contrasts, so a T2w on the T1w of the same head
    scores high (IXI002: 0.74) and an unrelated image near 0.
    """
    import ants

    fixed_lo = ants.resample_image(fixed, (spacing,) * 3, False, 0)
    moving_lo = ants.resample_image(moving, (spacing,) * 3, False, 0)
    with ants_seed(seed), tempfile.TemporaryDirectory() as tmp:
        reg = ants.registration(fixed_lo, moving_lo, type_of_transform='Rigid',
                                aff_metric='mattes', outprefix=f'{tmp}/rigid_')
        warped = ants.apply_transforms(fixed, moving, reg['fwdtransforms'])
        kept = _keep(reg['fwdtransforms'], out_prefix)
    mask = ants.get_mask(fixed).numpy() > 0
    grad_f = ants.iMath(fixed, 'Grad', 1).numpy()
    grad_m = ants.iMath(warped, 'Grad', 1).numpy()
    return kept[0], masked_correlation(grad_f, grad_m, mask)


def fov_mask_image(moving):
    """The entry's field of view (foreground above 5 % of its maximum, dilated 3 voxels)."""
    import ants

    return ants.iMath(ants.get_mask(moving, low_thresh=0.05 * float(moving.max()), cleanup=0),
                      'MD', 3)


def affine_fov_to(fixed, moving, mask, tmp: str, seed: int | None = 0):
    """Affine (Mattes, 2 mm, from identity) of ``moving`` onto ``fixed`` inside ``moving``'s
    field of view ``mask``. Returns ANTs' forward transform list."""
    import ants

    lo = (2.0,) * 3
    identity = identity_transform(str(Path(tmp) / 'identity.mat'))
    with ants_seed(seed):
        aff = ants.registration(ants.resample_image(fixed, lo, False, 0),
                                ants.resample_image(moving, lo, False, 0),
                                type_of_transform='Affine', initial_transform=identity,
                                moving_mask=ants.resample_image(mask, lo, False, 1),
                                outprefix=f'{tmp}/fov_')
    return aff['fwdtransforms']


def syn_to(fixed, moving, out_prefix: str, seed: int | None = 0,
           iterations: tuple[int, ...] = (40, 20, 0), spacing: float = 1.0):
    """Affine (2 mm) then SyN (mutual information, at ``spacing`` mm) of ``moving`` onto ``fixed``.

    Library templates are cropped around the cerebellum (zero elsewhere), so every stage
    measures similarity only inside the template's own field of view (its dilated foreground,
    as the moving mask); otherwise SyN stretches the cerebellum over the occipital lobe. Both
    start from identity: entries and subjects are already affinely in MNI space.

    Returns the forward transform list in ``ants.apply_transforms`` order (warp, affine).
    """
    import ants

    mask = fov_mask_image(moving)
    with tempfile.TemporaryDirectory() as tmp:
        affine = affine_fov_to(fixed, moving, mask, tmp, seed)
        sp = (spacing,) * 3
        with ants_seed(seed):
            reg = ants.registration(ants.resample_image(fixed, sp, False, 0),
                                    ants.resample_image(moving, sp, False, 0),
                                    type_of_transform='SyNOnly', initial_transform=affine,
                                    moving_mask=ants.resample_image(mask, sp, False, 1),
                                    reg_iterations=tuple(iterations), outprefix=f'{tmp}/syn_')
        return _keep(reg['fwdtransforms'], out_prefix)


def affine_determinant(transform_file: str) -> float:
    """Determinant of the linear part of an ANTs affine ``.mat`` (volume ratio template/moving).

    ANTs stores the fixed->moving point mapping, so the determinant is the volume of one
    template mm^3 in the moving (native) image.
    """
    return float(np.linalg.det(read_affine(transform_file)[:3, :3]))


def crop_to_box(image, transforms: list[str], box_reference, margin_mm: float = 6.0):
    """Crop a native image to the region that ``transforms`` maps into ``box_reference``.

    ``transforms`` go from native to box space in ``ants.apply_transforms`` order (they map
    box points into the native image). Used to denoise only what the working grid will see.
    """
    import itertools

    import ants
    import pandas as pd

    origin = np.asarray(box_reference.origin)
    extent = (np.asarray(box_reference.shape) - 1) * np.asarray(box_reference.spacing)
    direction = np.asarray(box_reference.direction)
    corners = [origin + direction @ (extent * np.array(c))
               for c in itertools.product((0, 1), repeat=3)]
    frame = {'x': [c[0] for c in corners], 'y': [c[1] for c in corners],
             'z': [c[2] for c in corners]}
    mapped = ants.apply_transforms_to_points(3, pd.DataFrame(frame), transforms)
    idx = np.array([ants.transform_physical_point_to_index(image, tuple(p))
                    for p in mapped[['x', 'y', 'z']].to_numpy()])
    pad = np.ceil(margin_mm / np.asarray(image.spacing)).astype(int)
    lo = np.maximum(np.floor(idx.min(axis=0)).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + pad + 1, image.shape)
    if np.any(hi <= lo):
        return image
    return ants.crop_indices(image, lo.tolist(), hi.tolist())


def affine_to_box(t1_path: str, assets, seed: int = 0, spacing: float | None = None):
    """A T1w on the working grid by the affine path only (no N4 or denoising): for benchmarks and
    for the registration network's training data, not for segmentation.

    Registers to MNI152NLin2009cAsym (mirror-averaged, as the pipeline) with
    :func:`affine_to_template`, resamples linearly into the assets' box (at ``spacing`` mm when
    given) and normalises intensities. Returns the array and the template-fit correlation.
    """
    import tempfile

    import ants
    import nibabel as nib

    from cerebseg.utils.grid import BoxGrid
    from cerebseg.utils.images import mirror_average, nib_to_ants
    from cerebseg.utils.preproc import is_skull_stripped, normalise_intensity

    img = nib.load(t1_path)
    data = np.asarray(img.dataobj, np.float32)
    tpl = assets.manifest['templates']
    # the pipeline's target (MNIAffine): the template averaged with its mirror
    head, brain = (nib_to_ants(mirror_average(nib.load(str(assets.path(tpl[k])))))
                   for k in ('head', 'brain'))
    mask = np.asarray(mirror_average(nib.load(str(assets.path(tpl['mask'])))).dataobj) > 0.25
    with tempfile.TemporaryDirectory() as tmp:
        fit = affine_to_template(nib_to_ants(img), head, brain, mask,
                                 is_skull_stripped(data, img.header.get_zooms()[:3]),
                                 str(Path(tmp) / 'aff_'), seed=seed)
        ref = BoxGrid.from_dict(assets.manifest['grid']).reference(spacing)
        boxed = ants.apply_transforms(ref, nib_to_ants(img), [fit.transform],
                                      interpolator='linear').numpy()
    return normalise_intensity(boxed.clip(min=0)), fit.correlation
