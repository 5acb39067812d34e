"""Report figures from arrays: label mosaics in three planes, and before/after flickers.

Plain functions on canonical (RAS) arrays; the report interfaces load, reorient and resample.
Figures are SVG (matplotlib draws the slices as embedded PNG; the flicker is two such images
in one SVG whose upper one fades in and out with a CSS animation, paused under the mouse).
"""
from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger('cerebseg.utils.reports')

#: planes in the order of the mosaic rows: (name, the axis sliced in a RAS array)
PLANES = (('sagittal', 0), ('coronal', 1), ('axial', 2))


def _pyplot():
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def slice_positions(mask: np.ndarray, axis: int, n: int, margin: float = 0.1) -> list[int]:
    """``n`` slice indices along ``axis``, evenly spread over the extent of ``mask`` (its
    outer ``margin`` fraction left out); the middle of the array when the mask is empty."""
    if n < 1:
        raise ValueError(f'n must be at least 1, got {n}')
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(np.asarray(mask).any(axis=other))
    if present.size == 0:
        lo, hi = 0, mask.shape[axis] - 1
    else:
        lo, hi = int(present[0]), int(present[-1])
    span = hi - lo
    lo, hi = lo + margin * span, hi - margin * span
    if n == 1:
        return [int(round((lo + hi) / 2))]
    return [int(round(v)) for v in np.linspace(lo, hi, n)]


def crop_box(mask: np.ndarray, pad: int) -> tuple[slice, slice, slice]:
    """The bounding box of ``mask`` grown by ``pad`` voxels (the whole array if empty)."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return tuple(slice(0, s) for s in mask.shape)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def intensity_window(image: np.ndarray, mask: np.ndarray | None = None,
                     percentiles=(1.0, 99.5)) -> tuple[float, float]:
    """Display range: percentiles of the nonzero voxels (inside ``mask`` when given)."""
    values = image[mask > 0] if mask is not None and mask.any() else image[image != 0]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, percentiles)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice, transposed so that the row axis runs from top (superior/anterior) down."""
    return np.take(volume, index, axis=axis).T[::-1]


def _aspect(zooms, axis: int) -> float:
    cols, rows = [z for a, z in enumerate(zooms) if a != axis]
    return float(rows / cols)


def _mosaic(images: list[dict], zooms, positions: dict[int, list[int]], title: str,
            width: float = 11.0):
    """A figure with one row per plane and one column per slice. ``images``: layers drawn in
    order, each ``{'data': array, 'kind': 'grey'|'labels'|'contour', ...}``."""
    plt = _pyplot()
    n_cols = max(len(p) for p in positions.values())
    rows = [(name, axis) for name, axis in PLANES if axis in positions]
    shape = images[0]['data'].shape
    ratios = []
    for _, axis in rows:   # each row as high as its slices, drawn to scale
        cols_ax, rows_ax = [a for a in range(3) if a != axis]
        ratios.append(shape[rows_ax] * zooms[rows_ax] / (shape[cols_ax] * zooms[cols_ax]))
    height = width / n_cols * sum(ratios) + 0.35
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(width, height), squeeze=False,
                             facecolor='black', gridspec_kw={'height_ratios': ratios})
    for r, (name, axis) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(positions[axis]):
                continue
            index = positions[axis][c]
            for layer in images:
                sl = _plane(layer['data'], axis, index)
                if layer['kind'] == 'grey':
                    ax.imshow(sl, cmap='gray', vmin=layer['vmin'], vmax=layer['vmax'],
                              interpolation='none', aspect=_aspect(zooms, axis))
                elif layer['kind'] == 'labels':
                    rgba = layer['colours'][np.clip(sl, 0, len(layer['colours']) - 1)]
                    ax.imshow(rgba, interpolation='none', aspect=_aspect(zooms, axis))
                elif layer['kind'] == 'contour' and sl.any() and not sl.all():
                    ax.contour(sl.astype(float), levels=[0.5], colors=layer['colour'],
                               linewidths=0.6)
            ax.text(0.03, 0.03, f'{name[0].upper()} {index}', color='w', fontsize=6,
                    transform=ax.transAxes)
    fig.suptitle(title, color='w', fontsize=10, y=1 - 0.04 / height)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=1 - 0.3 / height,
                        wspace=0.02, hspace=0.02)
    return fig


def label_colours(lut: list[dict], alpha: float = 0.5) -> np.ndarray:
    """RGBA table indexed by label value (background transparent) from a LUT's rows
    (``index``, ``color`` as ``#rrggbb``)."""
    n = max(int(r['index']) for r in lut) + 1
    table = np.zeros((n, 4))
    for row in lut:
        idx = int(row['index'])
        if idx == 0:
            continue
        hexa = row['color'].lstrip('#')
        table[idx, :3] = [int(hexa[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        table[idx, 3] = alpha
    return table


def plot_label_mosaic(anat: np.ndarray, labels: np.ndarray, zooms, lut: list[dict],
                      out_file: str | Path, title: str, n_slices: int = 7,
                      pad_mm: float = 8.0) -> Path:
    """The labels over the anatomy in three planes, cropped around the labels.

    ``anat``, ``labels``: (X, Y, Z) arrays in RAS voxel order on the same grid, ``zooms`` their
    voxel size (mm). Writes an SVG and returns its path.
    """
    if anat.shape != labels.shape:
        raise ValueError(f'anatomy {anat.shape} and labels {labels.shape} differ in shape')
    labels = np.asarray(labels).astype(np.int64)
    fg = labels > 0
    box = crop_box(fg, int(round(pad_mm / min(zooms))))
    anat, labels, fg = anat[box], labels[box], fg[box]
    vmin, vmax = intensity_window(anat, fg)
    positions = {axis: slice_positions(fg, axis, n_slices) for _, axis in PLANES}
    layers = [{'data': anat, 'kind': 'grey', 'vmin': vmin, 'vmax': vmax},
              {'data': labels, 'kind': 'labels', 'colours': label_colours(lut)}]
    fig = _mosaic(layers, zooms, positions, title)
    return _save_svg(fig, out_file)


def _save_svg(fig, out_file) -> Path:
    from cerebseg.utils.images import atomic_write_text

    buf = io.StringIO()
    fig.savefig(buf, format='svg', facecolor=fig.get_facecolor(), dpi=110)
    _pyplot().close(fig)
    return atomic_write_text(out_file, buf.getvalue())


def _png(fig) -> tuple[str, int, int]:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', facecolor=fig.get_facecolor(), dpi=100)
    width, height = (fig.get_size_inches() * 100).round().astype(int)
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode('ascii'), int(width), int(height)


def plot_flicker(fixed: np.ndarray, moving: np.ndarray, zooms, out_file: str | Path,
                 fixed_name: str, moving_name: str, title: str,
                 contour: np.ndarray | None = None, roi: np.ndarray | None = None,
                 n_slices: int = 6, period_s: float = 3.0) -> Path:
    """Before/after check of a registration: ``moving`` (already resampled onto ``fixed``'s
    grid) and ``fixed`` in the same three-plane mosaic, alternating (CSS animation, paused
    while the mouse is over it); ``contour`` (a mask, e.g. the template's brain) is drawn on
    both, so that a misfit shows as the edge moving against the anatomy.

    Slices are spread over ``roi`` (default: where ``fixed`` is nonzero).
    """
    if fixed.shape != moving.shape:
        raise ValueError(f'fixed {fixed.shape} and moving {moving.shape} differ in shape; '
                         'resample the moving image onto the fixed grid first')
    roi = (fixed != 0) if roi is None else roi
    positions = {axis: slice_positions(roi, axis, n_slices) for _, axis in PLANES}
    frames = []
    for image, name in ((fixed, fixed_name), (moving, moving_name)):
        vmin, vmax = intensity_window(image, roi)
        layers = [{'data': image, 'kind': 'grey', 'vmin': vmin, 'vmax': vmax}]
        if contour is not None:
            layers.append({'data': contour, 'kind': 'contour', 'colour': '#ff4040'})
        frames.append(_png(_mosaic(layers, zooms, positions, f'{title}: {name}')))
    (png_a, width, height), (png_b, _, _) = frames
    svg = f'''<svg xmlns="http://www.w3.org/2000/svg" version="1.1" viewBox="0 0 {width} {height}"
 width="{width}" height="{height}" preserveAspectRatio="xMidYMid meet">
<style>
@keyframes flicker {{ 0%, 45% {{ opacity: 1; }} 50%, 95% {{ opacity: 0; }} 100% {{ opacity: 1; }} }}
.moving {{ animation: flicker {period_s * 2:g}s infinite; }}
svg:hover .moving {{ animation-play-state: paused; }}
</style>
<title>{title}: {fixed_name} and {moving_name}, alternating</title>
<image x="0" y="0" width="{width}" height="{height}" href="data:image/png;base64,{png_a}"/>
<g class="moving"><image x="0" y="0" width="{width}" height="{height}"
 href="data:image/png;base64,{png_b}"/></g>
</svg>
'''
    from cerebseg.utils.images import atomic_write_text

    return atomic_write_text(out_file, svg)
