"""Dense deformations in torch: the grid, trilinear warping, scaling and squaring, resampling.

The arithmetic that :mod:`cerebseg.models.registration` (the instance optimisation), the
registration network and the trainers' random deformations share: displacement fields are in
voxels of the grid they act on (``ddf``) or in mm (``u``), velocities in mm on a coarser
control grid, and images are read with border padding (MONAI's ``Warp``; :func:`warp` is a
leaner copy, tested equal to it). Levels of a multi-resolution pyramid share the box corners
(:func:`level_shape`, :func:`level_spacing`), so fields carry over between levels exactly.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_BASE_GRIDS: dict = {}


def _base_grid(shape, device) -> torch.Tensor:
    """(1, 3, X, Y, Z) identity in grid_sample's normalised coordinates (cached per shape)."""
    key = (tuple(shape), str(device))
    if key not in _BASE_GRIDS:
        axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in shape]
        _BASE_GRIDS[key] = torch.stack(torch.meshgrid(*axes, indexing='ij'))[None]
        if len(_BASE_GRIDS) > 16:
            _BASE_GRIDS.pop(next(iter(_BASE_GRIDS)))
    return _BASE_GRIDS[key]


def warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = 'bilinear') -> torch.Tensor:
    """Read ``image`` (B, C, X, Y, Z) at ``x + ddf(x)``; ``ddf`` (B, 3, X, Y, Z) in voxels.

    The same operation as MONAI's ``Warp`` (corners aligned, border padding), without its
    per-call index shuffles: about 15 % of an optimisation step on CPU.
    """
    shape = ddf.shape[2:]
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=ddf.device,
                         dtype=ddf.dtype).view(1, 3, 1, 1, 1)
    grid = (_base_grid(shape, ddf.device) + ddf * scale).permute(0, 2, 3, 4, 1).flip(-1)
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(image.shape[0], -1, -1, -1, -1)
    return F.grid_sample(image, grid, mode=mode, padding_mode='border', align_corners=True)


def integrate(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """Scaling and squaring (MONAI's ``DVF2DDF`` with border padding): exp(v), in voxels."""
    ddf = velocity / (2 ** steps)
    for _ in range(steps):
        ddf = ddf + warp(ddf, ddf)
    return ddf


def level_shape(shape, factor: float) -> tuple[int, ...]:
    """Grid of the same box (same corner voxel centres) ``factor`` times coarser."""
    return tuple(max(round((n - 1) / factor) + 1, 2) for n in shape)


def level_spacing(shape, spacing: float, lshape) -> torch.Tensor:
    """Voxel size (mm, per axis) of ``lshape`` spanning the box of ``shape`` at ``spacing``."""
    return torch.tensor([(n - 1) * spacing / (m - 1) for n, m in zip(shape, lshape)])


def _box_sum(x: torch.Tensor, sizes) -> torch.Tensor:
    for axis, w in enumerate(sizes):
        if w <= 1:
            continue
        dim, n, r = 2 + axis, x.shape[2 + axis], w // 2
        pad = [0, 0] * (2 - axis) + [r + 1, r]
        c = torch.cumsum(F.pad(x, pad), dim=dim)
        x = c.narrow(dim, w, n) - c.narrow(dim, 0, n)
    return x


_COUNTS: dict = {}


def box_mean(x: torch.Tensor, size) -> torch.Tensor:
    """Separable box mean over odd ``size`` (int or per axis); at the borders, the mean of the
    voxels inside the volume (``avg_pool3d(count_include_pad=False)``). Running sums (cumsum)
    make it independent of the window and 2.4 times faster than pooling, backward included."""
    sizes = [size] * 3 if isinstance(size, int) else list(size)
    key = (tuple(x.shape[2:]), tuple(sizes), str(x.device))
    if key not in _COUNTS:
        ones = torch.ones((1, 1) + tuple(x.shape[2:]), device=x.device, dtype=x.dtype)
        _COUNTS[key] = _box_sum(ones, sizes)
        if len(_COUNTS) > 32:
            _COUNTS.pop(next(iter(_COUNTS)))
    return _box_sum(x, sizes) / _COUNTS[key]


def downsample(volume: torch.Tensor, lshape, blocks: bool = False) -> torch.Tensor:
    """Resample to the coarser grid ``lshape`` of the same box, halving at most once per step.

    A halving step smooths with the binomial kernel (1, 2, 1) / 4 along each axis that shrinks
    (edges replicated) and resamples trilinearly onto the corner-aligned grid of the step. Both
    operations commute with reversing an axis, so a mirrored volume gives the mirrored result
    whatever the number of voxels (issue 9, mirror equivariance).

    ``blocks``: average 2x2x2 blocks instead of smoothing (the registration network's input,
    which was trained on it). The block centres sit half a fine voxel inside the box corners,
    which scales coordinates by (n - 2) / (n - 1) about the centre for both images alike (0.4 %
    at 0.5 -> 1 mm); on an odd number of voxels the last block is a single voxel, so the result
    is not left-right symmetric.
    """
    shape = tuple(volume.shape[2:])
    kernel = torch.tensor([0.25, 0.5, 0.25], dtype=volume.dtype, device=volume.device)
    while tuple(shape) != tuple(lshape):
        step = tuple(max(m, (n - 1) // 2 + 1) for n, m in zip(shape, lshape))
        if blocks:
            pool = [2 if m < n else 1 for n, m in zip(shape, step)]
            volume = F.avg_pool3d(volume, pool, stride=pool, ceil_mode=True)
        else:
            for axis, (n, m) in enumerate(zip(shape, step)):
                if m < n:
                    volume = _smooth_axis(volume, kernel, axis)
        volume = F.interpolate(volume, size=step, mode='trilinear', align_corners=True)
        shape = step
    return volume


def _smooth_axis(volume: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Convolve (B, C, X, Y, Z) along spatial ``axis`` with a 3-tap kernel, edges replicated."""
    dim = 2 + axis
    lo = volume.narrow(dim, 0, 1)
    hi = volume.narrow(dim, volume.shape[dim] - 1, 1)
    padded = torch.cat([lo, volume, hi], dim=dim)
    n = volume.shape[dim]
    return (kernel[0] * padded.narrow(dim, 0, n) + kernel[1] * padded.narrow(dim, 1, n)
            + kernel[2] * padded.narrow(dim, 2, n))


def resize_field(field_: torch.Tensor, lshape) -> torch.Tensor:
    """Trilinear resize of a (B, 3, ...) field in mm (values unchanged: they are physical)."""
    if tuple(field_.shape[2:]) == tuple(lshape):
        return field_
    return F.interpolate(field_, size=tuple(lshape), mode='trilinear', align_corners=True)


def grid_mm(lshape, sp: torch.Tensor, device) -> torch.Tensor:
    """(3, X, Y, Z) physical coordinates (mm) relative to the box centre."""
    axes = [(torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2) * float(s)
            for n, s in zip(lshape, sp)]
    return torch.stack(torch.meshgrid(*axes, indexing='ij'))


def displacement_mm(velocity_mm: torch.Tensor, lshape, sp: torch.Tensor, steps: int):
    """u = exp(v) in mm on ``lshape`` (velocity resized, integrated in voxel units)."""
    sp = sp.to(velocity_mm.device).view(1, 3, 1, 1, 1)
    v_vox = resize_field(velocity_mm, lshape) / sp
    return integrate(v_vox, steps) * sp


def affine_ddf(affine: torch.Tensor, lshape, sp: torch.Tensor, device) -> torch.Tensor:
    """Voxel displacement (K, 3, ...) on ``lshape`` that reads the entry at ``A x``."""
    x_mm = grid_mm(lshape, sp, device)
    mapped = torch.einsum('kij,j...->ki...', affine[:, :, :3], x_mm) \
        + affine[:, :, 3].view(-1, 3, 1, 1, 1)
    return (mapped - x_mm.unsqueeze(0)) / sp.to(device).view(1, 3, 1, 1, 1)


def sampling_ddf(affine: torch.Tensor, u_ctrl_mm: torch.Tensor, lshape, sp: torch.Tensor,
                 base: torch.Tensor | None = None) -> torch.Tensor:
    """Voxel displacement (MONAI DDF) on ``lshape`` that reads the entry at ``A (x + u(x))``.

    ``A (x + u) - x = (A x - x) + A_lin u``; the second term is formed on ``u``'s own (control)
    grid and then resized, which is exact for trilinear resizing and much cheaper. ``base``:
    :func:`affine_ddf` when already computed.
    """
    if base is None:
        base = affine_ddf(affine, lshape, sp, u_ctrl_mm.device)
    au = torch.einsum('kij,kj...->ki...', affine[:, :, :3], u_ctrl_mm)
    return base + resize_field(au, lshape) / sp.to(u_ctrl_mm.device).view(1, 3, 1, 1, 1)


def jacobian_determinant(mapping_mm: np.ndarray, spacing) -> np.ndarray:
    """det of the Jacobian of a point mapping given as (3, X, Y, Z) physical coordinates (mm)."""
    sp = np.broadcast_to(np.asarray(spacing, float), (3,))
    grads = [np.gradient(mapping_mm[i], *sp) for i in range(3)]      # grads[i][j] = d phi_i / d x_j
    jac = np.stack([np.stack(g) for g in grads])                     # (3, 3, X, Y, Z)
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
