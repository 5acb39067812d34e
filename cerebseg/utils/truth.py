"""Exact-truth test cases: a whole-brain template and its atlas put through a known transform.

A case is what a scanner would give if the template were a head: the template's T1w (and T2w)
read through a seeded random affine (rotations, scales, shifts) composed with a smooth random
displacement, sampled on an anisotropic, reoriented native grid with partial-volume averaging,
then given a smooth bias field, a contrast change and Rician noise. The atlas labels go through
the same transform, so the native-space truth (labels and per-label volumes) is known exactly,
up to the partial-volume rule: each native voxel gets the label that covers most of its
sub-samples, and the volume of each label is the sum of its sub-sample fractions.

Plain NumPy/SciPy; the benchmark (``benchmarks/accuracy.py``) and the tests use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: native grids a case can get: (voxel sizes in mm, axis codes); one is drawn per case
NATIVE_GRIDS = (
    ((1.0, 1.0, 1.2), ('L', 'P', 'S')),
    ((0.9, 1.3, 0.9), ('P', 'I', 'R')),
    ((1.2, 0.95, 0.95), ('S', 'R', 'A')),
    ((1.1, 1.1, 1.0), ('R', 'A', 'I')),
)

_AXIS = {'R': (0, 1), 'L': (0, -1), 'A': (1, 1), 'P': (1, -1), 'S': (2, 1), 'I': (2, -1)}


@dataclass(frozen=True)
class CaseSpec:
    """How far a case may be from its template (the defaults are issue 9's)."""

    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift_mm: float = 10.0
    max_displacement_mm: float = 3.0
    displacement_spacing_mm: float = 12.0
    bias_amplitude: float = 0.2
    gamma_range: tuple[float, float] = (0.8, 1.25)
    noise_fraction: float = 0.02
    margin_mm: float = 12.0
    supersample: int = 2


@dataclass
class Case:
    """One exact-truth case: native images, truth labels and the transform that made them."""

    t1w: np.ndarray
    affine: np.ndarray                 # native voxel -> world (mm)
    labels: np.ndarray                 # truth labels on the native grid (majority of sub-samples)
    volumes_mm3: np.ndarray            # exact per-label volume (fractions of sub-samples)
    t2w: np.ndarray | None = None
    t2w_affine: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def random_affine(rng, spec: CaseSpec) -> np.ndarray:
    """4x4 world -> world: rotation about each axis, per-axis scale, shift (about the origin)."""
    angles = np.deg2rad(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg, 3))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = r @ rot
    scales = rng.uniform(*spec.scale_range, 3)
    out = np.eye(4)
    out[:3, :3] = rot @ np.diag(scales)
    out[:3, 3] = rng.uniform(-spec.max_shift_mm, spec.max_shift_mm, 3)
    return out


def native_grid(bbox_mm: np.ndarray, zooms, axcodes, margin_mm: float):
    """Shape and voxel -> world affine of a grid with ``zooms`` and orientation ``axcodes``
    covering the world box ``bbox_mm`` ((2, 3): min and max corner) plus ``margin_mm``."""
    lo, hi = bbox_mm[0] - margin_mm, bbox_mm[1] + margin_mm
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    for vox_axis, code in enumerate(axcodes):
        world_axis, sign = _AXIS[code]
        zoom = float(zooms[vox_axis])
        n = int(np.ceil((hi[world_axis] - lo[world_axis]) / zoom)) + 1
        affine[world_axis, vox_axis] = sign * zoom
        affine[world_axis, 3] = lo[world_axis] if sign > 0 else lo[world_axis] + (n - 1) * zoom
        shape.append(n)
    return tuple(shape), affine


def _smooth_field(rng, shape, sigma: float) -> np.ndarray:
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode='wrap')
    return noise / max(np.abs(noise).max(), 1e-12)


class _Displacement:
    """Smooth random displacement u(p) (mm) of world points: a coarse lattice of Gaussian noise,
    smoothed and scaled to ``max_mm`` in its largest component, read by cubic B-splines."""

    def __init__(self, rng, bbox_mm, spacing_mm: float, max_mm: float):
        self.lo = np.asarray(bbox_mm[0], float) - 2 * spacing_mm
        self.spacing = float(spacing_mm)
        shape = tuple(int(np.ceil((bbox_mm[1][i] - self.lo[i]) / spacing_mm)) + 3
                      for i in range(3))
        self.coef = np.stack([_smooth_field(rng, shape, 1.0) for _ in range(3)]) * max_mm

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """``points`` (3, N) world mm -> displacement (3, N) mm."""
        from scipy import ndimage

        idx = (points - self.lo[:, None]) / self.spacing
        return np.stack([ndimage.map_coordinates(c, idx, order=3, mode='nearest')
                         for c in self.coef])


def _sample(data: np.ndarray, inv_affine: np.ndarray, world: np.ndarray,
            order: int, cval: float = 0.0) -> np.ndarray:
    """Read an array (world -> voxel ``inv_affine``) at world points (3, N): trilinear
    (``order`` 1) or nearest (0); ``cval`` outside."""
    from scipy import ndimage

    vox = inv_affine[:3, :3] @ world + inv_affine[:3, 3:4]
    return ndimage.map_coordinates(data, vox, order=order, mode='constant', cval=cval)


def _layers(source) -> list:
    """An intensity source as a list of images, finest first (see :func:`make_case`)."""
    return list(source) if isinstance(source, (list, tuple)) else [source]


def _sample_layers(layers: list, world: np.ndarray) -> np.ndarray:
    """Trilinear read of layered arrays: each point from the first layer whose grid holds it
    (0 outside the last)."""
    out = np.full(world.shape[1], np.nan, np.float32)
    for i, (data, inv_affine) in enumerate(layers):
        missing = np.isnan(out)
        if not missing.any():
            break
        out[missing] = _sample(data, inv_affine, world[:, missing], 1,
                               0.0 if i == len(layers) - 1 else np.nan)
    return out


def _subsample_offsets(n: int) -> np.ndarray:
    """(n^3, 3) sub-voxel centres in voxel units, for partial-volume averaging."""
    ticks = (np.arange(n) + 0.5) / n - 0.5
    return np.stack(np.meshgrid(ticks, ticks, ticks, indexing='ij'), -1).reshape(-1, 3)


def _render(sources: dict, shape, affine, to_template, linear: np.ndarray, n_labels: int,
            n_sub: int, chunk: int = 1 << 20) -> dict:
    """Average intensities and count label hits over ``n_sub^3`` sub-samples per native voxel.

    ``to_template`` maps native world points to template world points; it is evaluated at the
    voxel centres, and the sub-samples are placed around the mapped centre by ``linear`` (3x3,
    the transform's linear part): the displacement is smooth on a far larger scale than a voxel.
    """
    n_vox = int(np.prod(shape))
    out = {k: np.zeros(n_vox, np.float32) for k in sources if k != 'labels'}
    counts = np.zeros((n_labels, n_vox), np.uint8) if 'labels' in sources else None
    offsets = linear @ affine[:3, :3] @ _subsample_offsets(n_sub).T      # (3, n_sub^3) mm
    # each source read from disk once, not once per sub-sample and chunk
    arrays = {k: [(np.asarray(img.dataobj, np.int16 if k == 'labels' else np.float32),
                   np.linalg.inv(img.affine)) for img in _layers(src)]
              for k, src in sources.items()}
    grid = np.indices(shape).reshape(3, -1)
    for start in range(0, n_vox, chunk):
        vox = grid[:, start:start + chunk].astype(np.float64)
        index = np.arange(start, start + vox.shape[1])
        centre = to_template(affine[:3, :3] @ vox + affine[:3, 3:4])
        for off in offsets.T:
            tpl = centre + off[:, None]
            for key, layers in arrays.items():
                if key == 'labels':
                    lab = _sample(*layers[0], tpl, 0).astype(np.int64)
                    lab[(lab < 0) | (lab >= n_labels)] = 0
                    np.add.at(counts, (lab, index), 1)
                else:
                    out[key][index] += _sample_layers(layers, tpl) / offsets.shape[1]
    res = {k: v.reshape(shape) for k, v in out.items()}
    if counts is not None:
        res['counts'] = counts.reshape((n_labels,) + tuple(shape))
    return res


def truth_labels(counts: np.ndarray, n_sub: int) -> np.ndarray:
    """Hard truth from sub-sample counts (L, X, Y, Z): a voxel is labelled where more than half
    its sub-samples are (exactly half: on alternate voxels of a checkerboard, so that ties do not
    bias the total volume), with the label that covers most of them (ties: the lower index)."""
    fg = n_sub - counts[0].astype(np.int32)
    parity = np.indices(fg.shape).sum(0) % 2 == 0
    inside = (2 * fg > n_sub) | ((2 * fg == n_sub) & parity)
    return np.where(inside, 1 + np.argmax(counts[1:], axis=0), 0).astype(np.int16)


def make_case(t1w, labels, *, seed: int, n_labels: int, t2w=None, spec: CaseSpec = CaseSpec(),
              grid: tuple | None = None, t2w_grid: tuple | None = None) -> Case:
    """An exact-truth case from a whole-brain template (nibabel ``t1w``, optional ``t2w``) and
    its atlas ``labels`` (nibabel, values ``0 .. n_labels - 1``, any grid in the same space).

    ``t1w`` and ``t2w`` may each be a list of images in the same space, finest first: a point
    is read from the first whose grid holds it (a 0.3 mm cerebellum painted from manual labels
    over a 1 mm head, :mod:`cerebseg.assets.manual`); the last one's foreground sets the field
    of view.

    ``grid`` / ``t2w_grid``: (voxel sizes, axis codes) of the native T1w / T2w grids (default:
    drawn from :data:`NATIVE_GRIDS`; the T2w gets another one, as a separate acquisition).
    """
    rng = np.random.default_rng(seed)
    fwd = random_affine(rng, spec)                       # template world -> subject world
    inv = np.linalg.inv(fwd)
    base = _layers(t1w)[-1]
    data = np.asarray(base.dataobj, np.float32)
    fg = np.argwhere(data > 0.05 * np.percentile(data[data > 0], 99))
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)
    lo_v, hi_v = fg.min(0), fg.max(0)
    corner_vox = lo_v + corners * (hi_v - lo_v)
    corner_world = (base.affine[:3, :3] @ corner_vox.T + base.affine[:3, 3:4]).T
    subj = (fwd[:3, :3] @ corner_world.T + fwd[:3, 3:4]).T
    bbox = np.stack([subj.min(0), subj.max(0)])
    disp = _Displacement(rng, bbox + [[-spec.margin_mm], [spec.margin_mm]],
                         spec.displacement_spacing_mm, spec.max_displacement_mm)

    def to_template(world):
        """subject world p -> template world: inverse affine of (p + u(p))."""
        moved = world + disp(world)
        return inv[:3, :3] @ moved + inv[:3, 3:4]

    choices = rng.permutation(len(NATIVE_GRIDS))
    grid = grid or NATIVE_GRIDS[choices[0]]
    t2w_grid = t2w_grid or NATIVE_GRIDS[choices[1]]
    shape, affine = native_grid(bbox, grid[0], grid[1], spec.margin_mm)
    rendered = _render({'t1w': t1w, 'labels': labels}, shape, affine, to_template, inv[:3, :3],
                       n_labels, spec.supersample)
    counts = rendered['counts']
    n_sub = spec.supersample ** 3
    truth = truth_labels(counts, n_sub)
    volumes = counts.reshape(n_labels, -1).sum(1) / n_sub * float(np.prod(grid[0]))
    gamma = rng.uniform(*spec.gamma_range)
    t1 = _corrupt(rendered['t1w'], affine, shape, rng, spec, gamma)
    meta = {'seed': seed, 'affine_template_to_subject': fwd.round(6).tolist(),
            'zooms': list(grid[0]), 'axcodes': list(grid[1]), 'gamma': round(gamma, 4),
            'max_displacement_mm': spec.max_displacement_mm}
    case = Case(t1w=t1, affine=affine, labels=truth, volumes_mm3=volumes, meta=meta)
    if t2w is not None:
        shape2, affine2 = native_grid(bbox, t2w_grid[0], t2w_grid[1], spec.margin_mm)
        t2 = _render({'t2w': t2w}, shape2, affine2, to_template, inv[:3, :3], n_labels,
                     spec.supersample)['t2w']
        case.t2w = _corrupt(t2, affine2, shape2, rng, spec, 1.0)
        case.t2w_affine = affine2
        meta.update(t2w_zooms=list(t2w_grid[0]), t2w_axcodes=list(t2w_grid[1]))
    return case


def _corrupt(image: np.ndarray, affine, shape, rng, spec: CaseSpec, gamma: float) -> np.ndarray:
    """Contrast change (gamma), smooth multiplicative bias, Rician noise inside the image's
    support (a skull-stripped template stays exactly 0 outside the brain, as brain-extracted
    data do); 12-bit-like range."""
    support = image > 0
    pos = image[support]
    peak = float(np.percentile(pos, 99)) if pos.size else 1.0
    out = (np.clip(image / peak, 0, None) ** gamma)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    coarse = tuple(max(int(np.ceil(n * z / 40.0)), 2) for n, z in zip(shape, zooms))
    from scipy import ndimage

    field_ = _smooth_field(rng, coarse, 0.7)
    field_ = ndimage.zoom(field_, [n / c for n, c in zip(shape, coarse)], order=1)[
        :shape[0], :shape[1], :shape[2]]
    out = out * np.exp(spec.bias_amplitude * field_)
    sigma = spec.noise_fraction
    real = out + rng.normal(0, sigma, out.shape)
    imag = rng.normal(0, sigma, out.shape)
    out = np.where(support, np.sqrt(real ** 2 + imag ** 2), 0.0)
    return (out * 1000.0).astype(np.float32)


def case_volumes(case: Case) -> dict:
    """``{'total': mm^3, index: mm^3}``: exact volumes of the labels present."""
    vols = {i: float(v) for i, v in enumerate(case.volumes_mm3) if i and v > 0}
    vols['total'] = float(sum(vols.values()))
    return vols
