"""Image I/O: validation of user inputs, atomic writes, nibabel <-> ANTs conversion."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
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
#: the most voxels cerebseg reads from one image (a 0.5 mm whole head, 512^3, is 1.3e8); a
#: header that claims more is refused before any data is read (no gigabyte allocations, no
#: decompression bombs)
MAX_VOXELS = 2 ** 28
#: qform and sform of one header may differ by this much (mm, at the corners of the image)
QFORM_SFORM_TOLERANCE_MM = 1.0
#: an LPS <-> RAS flip (ANTs works in LPS physical space, NIfTI affines are RAS)
_LPS = np.diag([-1.0, -1.0, 1.0])


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as fobj:
        for block in iter(lambda: fobj.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def _raw_nifti1_pixdim(path: Path) -> np.ndarray | None:
    """The voxel sizes (pixdim[1:4]) as written in a NIfTI-1 file, before nibabel's fixes;
    None for other formats."""
    import struct

    try:
        with nib.openers.ImageOpener(str(path)) as fobj:
            block = fobj.read(348)
    except Exception:  # noqa: BLE001 - unreadable: nibabel's own reading reports it
        return None
    if len(block) < 348:
        return None
    for order in '<>':
        if struct.unpack(order + 'i', block[:4])[0] == 348:
            return np.asarray(struct.unpack(order + '3f', block[80:92]), dtype=float)
    return None


def _check_spatial_header(img, path: Path, role: str) -> None:
    """Voxel sizes, affine and qform/sform agreement of a header (BadDataError)."""
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    raw = _raw_nifti1_pixdim(path)   # nibabel silently turns 0 into 1 and -1 into 1
    if raw is not None:
        zooms = np.where(np.isfinite(raw) & (raw > 0), zooms, raw)
    lo, hi = VOXEL_SIZE_RANGE
    if not np.all(np.isfinite(zooms)) or np.any(zooms < lo) or np.any(zooms > hi):
        raise BadDataError(
            f'The {role} {path} has voxel sizes {tuple(np.round(zooms, 4))} mm, outside the '
            f'plausible range [{lo}, {hi}] mm; the header is wrong or this is not a structural '
            'scan. Fix the NIfTI header (pixdim) or re-convert the DICOMs.')
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise BadDataError(f'The {role} {path} has an invalid (singular or non-finite) affine '
                           'in its header; re-convert the DICOMs (e.g. with dcm2niix).')
    header = img.header
    if not hasattr(header, 'get_qform'):
        return
    offset = float(getattr(img.dataobj, 'offset', header.sizeof_hdr + 4))   # the file's vox_offset
    single = bytes(header['magic']).rstrip(b'\0') in (b'n+1', b'n+2')
    if single and not (np.isfinite(offset) and offset >= header.sizeof_hdr + 4):
        raise BadDataError(
            f'The {role} {path} has vox_offset {offset} in its header: the data of a single-file '
            f'NIfTI starts after the header (at {header.sizeof_hdr + 4} or later), so the '
            'header is corrupt. Re-convert the DICOMs (e.g. with dcm2niix).')
    qcode, scode = int(header['qform_code']), int(header['sform_code'])
    if qcode > 0 and scode > 0:
        qform, sform = header.get_qform(), header.get_sform()
        if not (np.all(np.isfinite(qform)) and np.all(np.isfinite(sform))):
            raise BadDataError(f'The {role} {path} has a non-finite qform or sform.')
        corners = np.array([[i, j, k, 1.0] for i in (0, img.shape[0] - 1)
                            for j in (0, img.shape[1] - 1) for k in (0, img.shape[2] - 1)])
        gap = float(np.abs(corners @ (qform - sform).T)[:, :3].max())
        if gap > QFORM_SFORM_TOLERANCE_MM:
            raise BadDataError(
                f'The {role} {path} has a qform and an sform that disagree by {gap:.1f} mm '
                '(they place the image in two different places); cerebseg will not choose. '
                'Make them agree (e.g. fslorient -copysform2qform, or nibabel '
                'img.set_qform(img.get_sform())) in a copy of the image.')


def load_checked(path: str | os.PathLike, role: str = 'image') -> nib.Nifti1Image:
    """Load a NIfTI and refuse what cerebseg cannot segment, naming the file and the problem.

    Accepts 3D images and 4D images with a single volume (squeezed). Raises
    :class:`~cerebseg.errors.BadDataError` for unreadable or truncated files, 2D, 4D,
    headers that claim more than :data:`MAX_VOXELS` voxels (checked before any data is read),
    absurd voxel sizes, singular or non-finite affines, a qform and an sform that disagree,
    non-finite data and constant images.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        header_shape = tuple(int(n) for n in img.shape)
    except Exception as err:  # noqa: BLE001 - every way a header can be broken
        raise BadDataError(
            f'Cannot read the {role} {path}: {err}. The file is truncated or not a NIfTI image; '
            're-export it from the scanner DICOMs (e.g. with dcm2niix).') from err
    n_voxels = int(np.prod(header_shape, dtype=np.float64)) if header_shape else 0
    if not header_shape or min(header_shape) < 1 or n_voxels > MAX_VOXELS:
        raise BadDataError(
            f'The {role} {path} claims {header_shape} voxels in its header ({n_voxels:.3g} in '
            f'all; the most cerebseg reads is {MAX_VOXELS:.3g}); the header (dim) is wrong or '
            'this is not a structural scan. Re-convert the DICOMs (e.g. with dcm2niix).')
    shape = header_shape
    ndim = 3 if len(shape) == 4 and shape[3] == 1 else len(shape)
    if ndim != 3:
        kind = '2D' if ndim == 2 or min(shape[:3]) == 1 else f'{ndim}D'
        raise BadDataError(
            f'The {role} {path} is {kind} (shape {shape}); cerebseg needs a single 3D volume. '
            'Pass a 3D structural image (split 4D series first, e.g. with fslsplit).')
    if min(shape[:3]) < MIN_AXIS_VOXELS:
        raise BadDataError(
            f'The {role} {path} has shape {shape[:3]}: fewer than {MIN_AXIS_VOXELS} voxels '
            'along an axis, which is a slab or a localizer, not a 3D anatomical scan.')
    _check_spatial_header(img, path, role)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # noqa: BLE001 - truncated, bad offset, corrupt gzip, ...
        raise BadDataError(
            f'Cannot read the {role} {path}: {err}. The file is truncated or not a NIfTI image; '
            're-export it from the scanner DICOMs (e.g. with dcm2niix).') from err
    if data.ndim == 4:
        data = data[..., 0]
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


#: the mirror about the world plane x = 0 (the same matrix in RAS and in ANTs' LPS)
WORLD_MIRROR = np.diag([-1.0, 1.0, 1.0, 1.0])


def mirror_on_grid(data: np.ndarray, affine: np.ndarray, order: int = 1) -> np.ndarray:
    """``data`` mirrored about the world plane x = 0, on its own grid (``affine``).

    When the grid is symmetric about x = 0 (the MNI152NLin2009cAsym 1 mm grid is: x from -96 to
    96; so is cerebseg's working box) the mirror is a voxel flip; otherwise it is resampled
    (spline ``order``, zero outside).
    """
    from scipy import ndimage

    # voxel -> voxel map of the mirror: v' = A^-1 F A v
    vox = np.linalg.inv(affine) @ WORLD_MIRROR @ affine
    lin, off = vox[:3, :3], vox[:3, 3]
    axis = [i for i in range(3) if np.isclose(lin[i, i], -1.0)]
    exact = (len(axis) == 1 and np.allclose(np.abs(lin), np.eye(3), atol=1e-6)
             and np.isclose(off[axis[0]], data.shape[axis[0]] - 1, atol=1e-4)
             and np.allclose(np.delete(off, axis[0]), 0, atol=1e-4))
    if exact:
        return np.flip(data, axis[0])
    return ndimage.affine_transform(data, lin, off, order=order, mode='constant')


def mirror_average(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """The image averaged with its mirror about the world plane x = 0 (same grid, float32).

    The affine target of cerebseg (issue 9): registering a T1w and its left-right mirror to a
    template that is its own mirror gives mirrored transforms, so left and right are treated
    alike from the first step. The mirror is :func:`mirror_on_grid` (trilinear where the grid
    is not symmetric about x = 0).
    """
    data = np.asarray(img.dataobj, np.float32)
    return nib.Nifti1Image(0.5 * (data + mirror_on_grid(data, img.affine)), img.affine)


def mirror_world(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """The image mirrored about the world plane x = 0 by its affine alone: the same voxels
    (float32), the affine ``WORLD_MIRROR @ affine``. No resampling: the mirror of the mirror is
    the image itself, voxel for voxel."""
    return nib.Nifti1Image(np.asarray(img.dataobj, np.float32), WORLD_MIRROR @ img.affine)
