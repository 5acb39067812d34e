"""Image I/O: validation of user inputs, atomic writes, nibabel <-> ANTs conversion."""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from cerebseg.errors import BadDataError

LOGGER = logging.getLogger('cerebseg.utils.images')

#: voxel sizes outside this range (mm) are refused as implausible for human structural MRI
VOXEL_SIZE_RANGE = (0.1, 4.0)
#: anatomical images need at least this many voxels along every axis
MIN_AXIS_VOXELS = 16
#: an LPS <-> RAS flip (ANTs works in LPS physical space, NIfTI affines are RAS)
_LPS = np.diag([-1.0, -1.0, 1.0])


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as fobj:
        for block in iter(lambda: fobj.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def load_checked(path: str | os.PathLike, role: str = 'image') -> nib.Nifti1Image:
    """Load a NIfTI and refuse what cerebseg cannot segment, naming the file and the problem.

    Accepts 3D images and 4D images with a single volume (squeezed). Raises
    :class:`~cerebseg.errors.BadDataError` for unreadable or truncated files, 2D, 4D,
    non-finite data, constant images and absurd voxel sizes.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError,
            nib.filebasedimages.ImageFileError) as err:
        raise BadDataError(
            f'Cannot read the {role} {path}: {err}. The file is truncated or not a NIfTI image; '
            're-export it from the scanner DICOMs (e.g. with dcm2niix).') from err
    shape = data.shape
    if data.ndim == 4 and shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        kind = '2D' if data.ndim == 2 or min(shape[:3]) == 1 else f'{data.ndim}D'
        raise BadDataError(
            f'The {role} {path} is {kind} (shape {shape}); cerebseg needs a single 3D volume. '
            'Pass a 3D structural image (split 4D series first, e.g. with fslsplit).')
    if min(shape[:3]) < MIN_AXIS_VOXELS:
        raise BadDataError(
            f'The {role} {path} has shape {shape[:3]}: fewer than {MIN_AXIS_VOXELS} voxels '
            'along an axis, which is a slab or a localizer, not a 3D anatomical scan.')
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    lo, hi = VOXEL_SIZE_RANGE
    if not np.all(np.isfinite(zooms)) or np.any(zooms < lo) or np.any(zooms > hi):
        raise BadDataError(
            f'The {role} {path} has voxel sizes {tuple(np.round(zooms, 4))} mm, outside the '
            f'plausible range [{lo}, {hi}] mm; the header is wrong or this is not a structural '
            'scan. Fix the NIfTI header (pixdim) or re-convert the DICOMs.')
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-6:
        raise BadDataError(f'The {role} {path} has an invalid (singular) affine in its header.')
    floats = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(floats)):
        bad = int(np.size(floats) - np.count_nonzero(np.isfinite(floats)))
        raise BadDataError(
            f'The {role} {path} contains {bad} NaN or infinite voxels; cerebseg will not guess '
            'them. Replace them (e.g. with 0) in a copy of the image.')
    if float(floats.max()) <= float(floats.min()):
        raise BadDataError(f'The {role} {path} is constant ({floats.min()}): there is no image.')
    return nib.Nifti1Image(floats, img.affine, img.header)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _atomic_target(path: str | os.PathLike, suffix: str = ''):
    """Yield a temporary name beside ``path``; rename it to ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp's 0600 would hide outputs from the group
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(img: nib.spatialimages.SpatialImage, path: str | os.PathLike) -> Path:
    """Save ``img`` to ``path`` through a temporary file in the same folder and a rename."""
    suffix = '.nii.gz' if str(path).endswith('.nii.gz') else Path(path).suffix
    with _atomic_target(path, suffix) as tmp:
        nib.save(img, tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with _atomic_target(path) as tmp:
        Path(tmp).write_text(text, encoding='utf-8')
    return Path(path)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    with _atomic_target(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def nib_to_ants(img: nib.spatialimages.SpatialImage, dtype='float32'):
    """nibabel image (RAS affine) -> ANTsImage (LPS origin and direction), no resampling."""
    import ants

    affine = np.asarray(img.affine, dtype=float)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    direction = _LPS @ (affine[:3, :3] / zooms)
    origin = _LPS @ affine[:3, 3]
    data = np.asarray(img.dataobj, dtype=dtype)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return ants.from_numpy(data, origin=tuple(origin), spacing=tuple(zooms),
                           direction=direction)


def ants_affine(aimg) -> np.ndarray:
    """The RAS voxel-to-world affine of an ANTsImage."""
    direction = np.asarray(aimg.direction, dtype=float)
    spacing = np.asarray(aimg.spacing, dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS @ np.asarray(aimg.origin, dtype=float)
    return affine


def ants_to_nib(aimg, dtype=None, header=None) -> nib.Nifti1Image:
    data = aimg.numpy()
    if dtype is not None:
        data = data.astype(dtype)
    out = nib.Nifti1Image(data, ants_affine(aimg), header=header)
    out.set_qform(out.affine, code=1)
    out.set_sform(out.affine, code=1)
    return out


def to_label_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A compact integer label image (int16, scaling removed) on ``affine``."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.int16), affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(1, 0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def to_probseg_image(probs: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """The probseg layout cerebseg writes: ``(X, Y, Z, L)`` uint8 in 1/255 steps, labels last."""
    img = nib.Nifti1Image(np.asarray(probs, dtype=np.uint8), affine)
    img.header.set_slope_inter(1.0 / 255, 0.0)
    return img


def read_probseg(path: str | os.PathLike) -> np.ndarray:
    """A file written by :func:`to_probseg_image` as ``(L, X, Y, Z)`` uint8 (probability * 255)."""
    raw = nib.load(path).dataobj.get_unscaled()
    return np.moveaxis(np.asarray(raw, np.uint8), -1, 0)


def mirror_average(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """The image averaged with its mirror about the world plane x = 0 (same grid, float32).

    The affine target of cerebseg (issue 9): registering a T1w and its left-right mirror to a
    template that is its own mirror gives mirrored transforms, so left and right are treated
    alike from the first step. When the grid is symmetric about x = 0 (the MNI152NLin2009cAsym
    1 mm grid is: x from -96 to 96) the mirror is a voxel flip; otherwise it is resampled
    (trilinear).
    """
    from scipy import ndimage

    data = np.asarray(img.dataobj, np.float32)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    # voxel -> voxel map of the mirror: v' = A^-1 F A v
    vox = np.linalg.inv(img.affine) @ flip @ img.affine
    lin, off = vox[:3, :3], vox[:3, 3]
    axis = [i for i in range(3) if np.isclose(lin[i, i], -1.0)]
    exact = (len(axis) == 1 and np.allclose(np.abs(lin), np.eye(3), atol=1e-6)
             and np.isclose(off[axis[0]], data.shape[axis[0]] - 1, atol=1e-4)
             and np.allclose(np.delete(off, axis[0]), 0, atol=1e-4))
    if exact:
        mirrored = np.flip(data, axis[0])
    else:
        mirrored = ndimage.affine_transform(data, lin, off, order=1, mode='constant')
    return nib.Nifti1Image(0.5 * (data + mirrored), img.affine)
