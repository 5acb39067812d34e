"""Diffeomorphic multi-atlas registration in torch (CPU or GPU), by instance optimisation.

Model. Every library entry ``k`` is mapped onto the subject by

    phi_k(x) = A_k (x + u_k(x)),      u_k = exp(v_k)

where ``x`` are physical coordinates (mm, relative to the box centre) of the subject's working
grid, ``A_k`` an affine (3 x 4, identity at start: entries and subjects are already affinely in
MNI space) and ``u_k`` the displacement obtained from a stationary velocity field ``v_k`` by
scaling and squaring (``2**steps`` compositions, as MONAI's ``DVF2DDF``). The entry image is read
at ``phi_k(x)`` (trilinear, border padding, as MONAI's ``Warp``; :func:`warp` is a leaner copy,
tested equal to it). ``v_k`` lives on a control grid no finer
than ``control_mm`` and is upsampled trilinearly to the grid it is integrated on.

Objective, per entry: ``-mean_{x in M_k} LNCC_k(x) + lambda * mean |grad u_k|^2`` where LNCC is the
squared local normalised cross-correlation of MONAI's loss (cubic window of ``window`` voxels at
every level) and the regulariser the diffusion energy of the displacement in mm per mm (on the
control grid, where ``u`` is integrated before it is upsampled to the level's grid).

Library templates are cropped at the cerebellar surface (zero elsewhere), so where the similarity
is measured decides the volumes. By default (``space='entry'``, :class:`EntryLNCC`) it is measured
in each entry's own space, over the voxels where the entry has data (``M_k``, fixed), with the
subject read at ``phi_k(x) = A_k (x + u_k(x))``; the entry is then brought onto the subject by
the inverse, ``exp(-v_k)`` after ``A_k^-1``. ``space='fixed'`` (the first version, kept for the
registration network) measures it on the subject grid inside the entry's field of view dilated by
2 mm (:class:`MaskedLNCC`) and reads the entry at ``phi_k``: the zero background of the crop then
faces the subject's occipital lobe and the optimiser pulls the entry's tissue over it, making every
warped cerebellum 25-30 % too large (issue 9).

Optimisation: Adam, coarse to fine over ``levels_mm`` (images resampled after box smoothing, all
levels share the box corners, so fields carry over exactly), all ``K`` entries in one batch. An
affine stage (Adam on ``A_k`` at the coarsest level) runs first. The velocity can be initialised
(``init_velocity``), e.g. by :class:`cerebseg.models.regnet.RegNet`.

Everything here takes and returns arrays on the working grid; the device comes from
:func:`cerebseg.models.inference.resolve_device`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cerebseg.models.warp import (affine_ddf, box_mean, displacement_mm, downsample, grid_mm,
                                   level_shape, level_spacing, resize_field, sampling_ddf, warp)

LOGGER = logging.getLogger('cerebseg.models.registration')


@dataclass(frozen=True)
class SVFConfig:
    """Settings of :func:`register_svf` (defaults: the benchmarked ones)."""

    #: 4, 2 and 1 mm with diffusion weight 8 (issue 9, exact-truth cases in the working box,
    #: library entries SUIT and MNI152NLin2009cSymC: mean lobular Dice 0.827 / 0.850 at (4, 2) mm
    #: and weight 2, 0.843 / 0.855 here; whole-cerebellum Dice +0.005; +2 s per entry)
    levels_mm: tuple[float, ...] = (4.0, 2.0, 1.0)
    iterations: tuple[int, ...] = (30, 20, 10)
    affine_iterations: int = 25
    control_mm: float = 4.0
    window: int = 3
    smoothness: float = 8.0
    learning_rate: float = 0.2
    affine_learning_rate: float = 0.005
    steps: int = 5
    #: where the similarity is measured: 'entry' (default), on each entry's own data, the
    #: subject read into the entry (:class:`EntryLNCC`); 'fixed', on the subject grid inside
    #: each entry's field of view dilated by 2 mm (:class:`MaskedLNCC`; inflates cropped
    #: entries, kept for the registration network, which was trained so)
    space: str = 'entry'


#: after the registration network: the finest level only (no affine, no 4 mm level), in the
#: network's convention (entry read on the subject grid)
REFINE_CONFIG = SVFConfig(levels_mm=(4.0, 2.0), iterations=(0, 20), affine_iterations=0,
                          space='fixed', smoothness=0.5)

#: the brainstem label set onto a subject's 1 mm brainstem box
#: (:func:`cerebseg.utils.brainstem_parts.register_label_set`, similarity over the whole box). The
#: atlas image is the uncropped brain on the box, so the subject-grid similarity ('fixed') meets
#: none of the crop edges that inflate cerebellar entries; in the entry's space ('entry') the
#: template's brain mask stops at the brainstem surface, where the prepontine CSF is normalised
#: to 0, and every brainstem came out smaller. Issue 10, exact-truth cases (seeds 1-3) on the
#: box, total volume / whole Dice / mean nucleus Dice: 'entry', weight 8, template data
#: -5.7 % / 0.955 / 0.734; 'fixed', weight 8, field of view -4.2 % / 0.963 / 0.744; 'fixed',
#: weight 4, whole box -1.6 % / 0.964 / 0.744 (weight 2: +0.9 % / 0.960). The cases' own
#: template in place of the atlas image gives -1.0 ... 0.0 % with any of them: the rest is the
#: difference between the two templates.
BRAINSTEM_CONFIG = SVFConfig(space='fixed', smoothness=4.0)


@dataclass
class SVFResult:
    """Transforms of ``K`` entries onto one subject (see the module docstring).

    ``inverse`` False: ``A (x + exp(v)(x))`` reads the entry at subject point ``x``; True
    (``space='entry'``): it reads the subject at entry point ``x``, and entries are brought onto
    the subject by its inverse, ``exp(-v)`` after ``A^-1`` (:func:`transform_ddf`).
    """

    affine: np.ndarray            # (K, 3, 4), mm -> mm
    velocity: np.ndarray          # (K, 3, cx, cy, cz), mm, on the control grid
    shape: tuple[int, int, int]   # working grid the result applies to
    spacing: float                # its voxel size (mm)
    steps: int = 5
    losses: list = field(default_factory=list)  # (stage, final loss per entry, seconds)
    inverse: bool = False


def settings_fingerprint() -> str:
    """cerebseg's version and the registration settings, as text: Nipype nodes that register
    carry it as an input, so that a re-run in an old work folder recomputes them after an
    upgrade or a change of settings instead of reusing stale results."""
    from cerebseg import __version__

    return (f'cerebseg {__version__}; default {SVFConfig()!r}; refine {REFINE_CONFIG!r}; '
            f'brainstem {BRAINSTEM_CONFIG!r}')


#: the affine stage starts at the identity, where every sample falls on a voxel centre and the
#: derivative of trilinear interpolation is one-sided (the forward difference): a mirrored
#: subject then gets a different first step, which Adam's normalised steps magnify (affines
#: differed by 0.5 % in scale and 0.5 mm after 25 steps, issue 9). The loss is averaged over
#: samples shifted by these eight corner offsets (voxels): each derivative is then half forward
#: and half backward, and the set of offsets is its own mirror along every axis.
_KNOT_OFFSETS = torch.tensor([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1)
                              for sz in (-1, 1)], dtype=torch.float32).view(8, 1, 3, 1, 1, 1) * 1e-2


def diffusion_energy(u_mm: torch.Tensor, sp: torch.Tensor) -> torch.Tensor:
    """Mean squared spatial derivative of a (K, 3, X, Y, Z) displacement (mm per mm), per entry."""
    terms = []
    for axis in range(3):
        d = torch.diff(u_mm, dim=2 + axis) / float(sp[axis])
        terms.append((d * d).mean(dim=(1, 2, 3, 4)))
    return sum(terms)


class MaskedLNCC:
    """Squared local normalised cross-correlation with a fixed image, averaged inside masks.

    The same quantity as MONAI's ``LocalNormalizedCrossCorrelationLoss`` (rectangular window)
    with the fixed image's local statistics computed once and separable box means (borders: mean
    over the voxels inside the volume).
    """

    def __init__(self, fixed: torch.Tensor, mask: torch.Tensor, window: int,
                 eps: float = 1e-5):
        self.window, self.eps = int(window), eps
        self.mask = mask
        self.weight = mask.sum(dim=(1, 2, 3, 4)).clamp_min(1.0)
        self.t_mean = self._box(fixed)
        self.t_var = (self._box(fixed * fixed) - self.t_mean ** 2).clamp_min(eps)
        self.fixed = fixed

    def _box(self, x):
        return box_mean(x, self.window)

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        """Mean LNCC in [0, 1] per entry of ``warped`` (K, 1, X, Y, Z)."""
        n = warped.shape[1]
        means = self._box(torch.cat([warped, warped * self.fixed, warped * warped], dim=1))
        p_mean, pt_mean, p2_mean = means[:, :n], means[:, n:2 * n], means[:, 2 * n:]
        cross = pt_mean - p_mean * self.t_mean
        p_var = (p2_mean - p_mean ** 2).clamp_min(self.eps)
        cc = cross * cross / (p_var * self.t_var)
        return (cc * self.mask).sum(dim=(1, 2, 3, 4)) / self.weight


class EntryLNCC:
    """Squared LNCC measured on each entry's own data, with the subject read into the entry.

    Library templates are cropped at the cerebellar surface (zero outside). Measured on the
    subject grid inside a fixed, dilated field of view (:class:`MaskedLNCC`), the subject's
    occipital lobe faces the entry's zero background, and those windows gain correlation only
    when the entry's tissue is pulled over it: every warped cerebellum comes out 25-30 % too
    large. A mask that moves with the entry instead lets the optimiser choose where to compare
    (it still grew the cerebellum by 5-8 %). Here the comparison runs over a set of voxels that
    does not move, the entry's data ``valid`` (K, 1, ...) in its own space: local means,
    variances and the covariance are taken over the valid voxels of each window (weighted box
    means, so the crop edge is no image edge) and averaged with weight ``valid * box(valid)``.
    The entry's statistics are computed once.
    """

    def __init__(self, entries: torch.Tensor, valid: torch.Tensor, window: int,
                 eps: float = 1e-5):
        self.window, self.eps, self.valid = int(window), eps, valid
        w, sa, saa = box_mean(torch.cat([valid, valid * entries, valid * entries * entries],
                                        dim=1), self.window).split(1, dim=1)
        self.norm = w.clamp_min(eps)
        self.a_mean = sa / self.norm
        self.a_var = (saa / self.norm - self.a_mean ** 2).clamp_min(eps)
        self.weight = valid * w
        self.total = self.weight.sum(dim=(1, 2, 3, 4)).clamp_min(1e-6)
        self.entries = entries

    def __call__(self, subject: torch.Tensor) -> torch.Tensor:
        """Mean LNCC in [0, 1] per entry; ``subject`` (K, 1, ...) read at each entry's points."""
        v = self.valid
        sb, sbb, sab = box_mean(torch.cat([v * subject, v * subject * subject,
                                           v * self.entries * subject], dim=1),
                                self.window).split(1, dim=1)
        b_mean = sb / self.norm
        b_var = (sbb / self.norm - b_mean ** 2).clamp_min(self.eps)
        cross = sab / self.norm - self.a_mean * b_mean
        cc = cross * cross / (self.a_var * b_var)
        return (cc * self.weight).sum(dim=(1, 2, 3, 4)) / self.total


def data_mask(moving: np.ndarray) -> np.ndarray:
    """(K, X, Y, Z) where each entry has image data: its non-zero voxels, closed, with enclosed
    holes (dark CSF that the intensity normalisation set to 0, e.g. the fourth ventricle)
    filled."""
    from scipy import ndimage

    out = np.zeros(moving.shape, bool)
    for k, vol in enumerate(moving):
        out[k] = ndimage.binary_fill_holes(ndimage.binary_closing(vol > 0, iterations=2))
    return out


def _as_tensor(array, device):
    return torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32), device=device)


def fov_mask(moving, fraction: float = 0.05, dilate_vox: int = 4, peak=None):
    """Each entry's field of view: intensity above ``fraction`` of its maximum (``peak``, default
    the volume's own), dilated by a cube of ``2 dilate_vox + 1``. NumPy (K, ...) in, NumPy out;
    a (K, 1, ...) tensor in, a float tensor out."""
    is_tensor = torch.is_tensor(moving)
    vol = moving if is_tensor else \
        torch.as_tensor(np.ascontiguousarray(moving, np.float32))[:, None]
    if peak is None:
        peak = vol.amax(dim=(1, 2, 3, 4), keepdim=True)
    fg = (vol > fraction * peak).float()
    w = 2 * dilate_vox + 1
    for kernel in ((w, 1, 1), (1, w, 1), (1, 1, w)):
        fg = F.max_pool3d(fg, kernel, stride=1, padding=[k // 2 for k in kernel])
    return fg if is_tensor else fg[:, 0].numpy() > 0


def _similarity(fixed_l, moving_l, mask_l, window: int, in_entry: bool):
    """The level's similarity and the image it reads through the transform: the subject, read
    into each entry (``in_entry``), or the entries, read onto the subject grid."""
    if in_entry:
        return EntryLNCC(moving_l, mask_l, window), fixed_l.expand(moving_l.shape[0], -1, -1, -1,
                                                                    -1)
    return MaskedLNCC(fixed_l, mask_l, window), moving_l


def register_svf(fixed: np.ndarray, moving: np.ndarray, *, spacing: float = 0.5,
                 mask: np.ndarray | None = None, config: SVFConfig = SVFConfig(),
                 device='cpu', init_velocity: np.ndarray | None = None,
                 init_affine: np.ndarray | None = None, seed: int = 0) -> SVFResult:
    """Register ``K`` entries (``moving`` (K, X, Y, Z)) onto ``fixed`` (X, Y, Z) in one batch.

    Intensities should be normalised alike (cerebseg maps the 2nd/98th foreground percentiles to
    0/1); LNCC is insensitive to the remaining contrast differences. ``mask`` (K, X, Y, Z) is
    where each entry's similarity counts: with ``config.space == 'entry'`` its data in its own
    space (default :func:`data_mask`), with ``'fixed'`` a region of the subject grid (default
    :func:`fov_mask`, dilated by 2 mm).
    ``init_velocity`` (K, 3, ...), in mm on any grid of the box (e.g. the registration network's
    prediction), is where the velocity optimisation starts; the affine stage then does not run.
    ``init_affine`` (K, 3, 4) is where the affine starts (default identity).
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    if fixed.ndim != 3 or moving.ndim != 4 or moving.shape[1:] != fixed.shape:
        raise ValueError(f'fixed must be (X, Y, Z) and moving (K, X, Y, Z) on the same grid; got '
                         f'{fixed.shape} and {moving.shape}')
    if len(config.levels_mm) != len(config.iterations):
        raise ValueError('levels_mm and iterations must have the same length')
    if config.space not in ('entry', 'fixed'):
        raise ValueError(f"SVFConfig.space must be 'entry' or 'fixed', not {config.space!r}")
    in_entry = config.space == 'entry'
    n_atlas, shape = moving.shape[0], fixed.shape
    fixed_t = _as_tensor(fixed, device)[None, None]
    moving_t = _as_tensor(moving, device)[:, None]
    if mask is not None:
        mask_t = _as_tensor(mask, device)[:, None]
    else:
        mask_t = _as_tensor(data_mask(moving), device)[:, None] if in_entry else moving_t
    peak = moving_t.amax(dim=(1, 2, 3, 4), keepdim=True)
    eye = torch.eye(3, 4, device=device).expand(n_atlas, 3, 4)
    affine = (eye.clone() if init_affine is None else _as_tensor(init_affine, device)).clone()
    ctrl_factor = max(config.control_mm, config.levels_mm[0]) / spacing
    if init_velocity is not None:
        velocity = _as_tensor(init_velocity, device)
    else:
        velocity = torch.zeros((n_atlas, 3) + level_shape(shape, ctrl_factor), device=device)
    losses = []

    run_affine = bool(config.affine_iterations) and init_velocity is None
    needed = {lmm for lmm, n in zip(config.levels_mm, config.iterations) if n > 0}
    if run_affine:
        needed.add(config.levels_mm[0])
    # level (mm) -> (shape, spacing, fixed, moving, mask), each level made from the next finer;
    # the default mask (fov_mask: 2 mm dilation) is made on each level's grid, much cheaper
    levels, src = {}, (fixed_t, moving_t, mask_t)
    for lmm in sorted(needed):
        lshape = level_shape(shape, lmm / spacing)
        sp = level_spacing(shape, spacing, lshape)
        src = tuple(downsample(t, lshape) for t in src)
        if in_entry:  # the fraction of each coarse voxel that has data weighs it
            levels[lmm] = (lshape, sp, src[0], src[1], src[2])
            continue
        k_l = src[2] if mask is not None else fov_mask(
            src[2], peak=peak, dilate_vox=max(int(round(2.0 / float(sp.min()))), 1))
        levels[lmm] = (lshape, sp, src[0], src[1], (k_l > 0.5).float())

    # 1) affine stage at the coarsest level
    if run_affine:
        tic = time.perf_counter()
        lshape, sp, f_l, m_l, k_l = levels[config.levels_mm[0]]
        delta = torch.zeros((n_atlas, 3, 4), device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=config.affine_learning_rate)
        similarity, read = _similarity(f_l, m_l, k_l, config.window, in_entry)
        scale = torch.tensor([1.0, 1.0, 1.0, 10.0], device=device)  # translations in 10 mm units
        corners = _KNOT_OFFSETS.to(device)
        for _ in range(config.affine_iterations):
            opt.zero_grad()
            ddf = affine_ddf(affine + delta * scale, lshape, sp, device)
            loss = -sum(similarity(warp(read, ddf + c)).sum() for c in corners) / len(corners)
            loss.backward()
            opt.step()
        affine = (affine + delta.detach() * scale).contiguous()
        losses.append(('affine', float(loss.detach()) / n_atlas, time.perf_counter() - tic))

    # 2) velocity field, coarse to fine
    for lmm, n_iter in zip(config.levels_mm, config.iterations):
        if n_iter <= 0:
            continue
        tic = time.perf_counter()
        lshape, sp, f_l, m_l, k_l = levels[lmm]
        cshape = level_shape(shape, max(config.control_mm, lmm) / spacing)
        csp = level_spacing(shape, spacing, cshape)
        velocity = resize_field(velocity, cshape).detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([velocity], lr=config.learning_rate)
        similarity, read = _similarity(f_l, m_l, k_l, config.window, in_entry)
        base = affine_ddf(affine, lshape, sp, device)
        for _ in range(n_iter):
            opt.zero_grad()
            u_ctrl = displacement_mm(velocity, cshape, csp, config.steps)
            warped = warp(read, sampling_ddf(affine, u_ctrl, lshape, sp, base))
            loss = (-similarity(warped)
                    + config.smoothness * diffusion_energy(u_ctrl, csp)).sum()
            loss.backward()
            opt.step()
        losses.append((f'{lmm:g}mm', float(loss.detach()) / n_atlas, time.perf_counter() - tic))
        LOGGER.debug('level %s: loss %.4f, %.1f s', *losses[-1])
    return SVFResult(affine=affine.detach().cpu().numpy(),
                     velocity=velocity.detach().cpu().numpy(), shape=tuple(shape),
                     spacing=float(spacing), steps=config.steps, losses=losses,
                     inverse=in_entry)


def transform_ddf(result: SVFResult, device='cpu', index=None) -> torch.Tensor:
    """MONAI DDF (K, 3, X, Y, Z), voxel units of the full grid, of ``phi_k`` (or of entry
    ``index``)."""
    device = torch.device(device)
    sel = slice(None) if index is None else slice(index, index + 1)
    shape = result.shape
    sp = level_spacing(shape, result.spacing, shape)
    velocity = _as_tensor(result.velocity[sel], device)
    affine = _as_tensor(result.affine[sel], device)
    # integrate on the control grid (smooth there), then upsample the displacement
    cshape = tuple(result.velocity.shape[2:])
    csp = level_spacing(shape, result.spacing, cshape)
    if not result.inverse:
        return sampling_ddf(affine, displacement_mm(velocity, cshape, csp, result.steps), shape,
                            sp)
    # phi(x) = A (x + u(x)) read the subject at entry points; the entry is read at subject
    # point y by phi^-1(y) = w + u'(w), w = A^-1 y, u' = exp(-v) - id
    lin_inv = torch.linalg.inv(affine[:, :, :3])
    inv_affine = torch.cat([lin_inv, -lin_inv @ affine[:, :, 3:]], dim=2)
    to_w = affine_ddf(inv_affine, shape, sp, device)
    u_inv = resize_field(displacement_mm(-velocity, cshape, csp, result.steps), shape)
    return to_w + warp(u_inv, to_w) / sp.to(device).view(1, 3, 1, 1, 1)


@torch.no_grad()
def apply_svf(result: SVFResult, volumes: np.ndarray, *, order: int = 1, device='cpu'):
    """Warp (K, ...) or (K, C, ...) entry volumes onto the subject grid; ``order`` 0 for labels."""
    volumes = np.asarray(volumes)
    return np.stack(apply_svf_many(result, [(list(volumes), order)], device=device)[0])


@torch.no_grad()
def apply_svf_many(result: SVFResult, items, *, device='cpu') -> list:
    """Warp several ``(volumes, order)`` items with each entry's field built once.

    ``volumes`` holds one array per entry, (X, Y, Z) or (C, X, Y, Z), or None where an entry has
    none (e.g. no T2w); the result has the same layout.
    """
    out = [[None] * len(result.affine) for _ in items]
    for k in range(len(result.affine)):
        ddf = transform_ddf(result, device, index=k)
        for (volumes, order), dst in zip(items, out):
            if volumes[k] is None:
                continue
            vol = np.asarray(volumes[k])
            moved = warp(_as_tensor(vol if vol.ndim == 4 else vol[None], device)[None], ddf,
                         'nearest' if order == 0 else 'bilinear')[0].cpu().numpy()
            moved = moved if vol.ndim == 4 else moved[0]
            dst[k] = np.rint(moved).astype(vol.dtype) if order == 0 else moved
    return out


@torch.no_grad()
def svf_mapping_mm(result: SVFResult, index: int = 0, device='cpu') -> np.ndarray:
    """(3, X, Y, Z) physical coordinates phi(x) of entry ``index`` (for Jacobians)."""
    shape = result.shape
    sp = level_spacing(shape, result.spacing, shape)
    ddf = transform_ddf(result, device, index=index)[0]
    x = grid_mm(shape, sp, torch.device(device))
    return (x + ddf * sp.to(ddf.device).view(3, 1, 1, 1)).cpu().numpy()


