"""Intensity preprocessing as plain functions (ANTs images or NumPy arrays in, same out)."""
from __future__ import annotations

import logging

import numpy as np

LOGGER = logging.getLogger('cerebseg.utils.preproc')

#: a T1w whose non-zero voxels fill less than this volume (mL) is taken as skull-stripped:
#: a whole head (scalp, skull, neck) fills 3 to 5 L, an extracted adult brain 1 to 2 L.
SKULL_STRIPPED_MAX_ML = 2500.0


def nonzero_volume_ml(data: np.ndarray, zooms) -> float:
    return float(np.count_nonzero(data)) * float(np.prod(zooms)) / 1000.0


def is_skull_stripped(data: np.ndarray, zooms, max_ml: float = SKULL_STRIPPED_MAX_ML) -> bool:
    """Whether the image looks brain-extracted: its non-zero voxels fill less than ``max_ml``."""
    return nonzero_volume_ml(data, zooms) < max_ml


def bias_correct(aimg, mask=None, shrink_factor: int = 4):
    """N4 bias-field correction (ANTs), on a foreground mask computed when none is given."""
    import ants

    img = aimg.clone('float')
    arr = img.numpy()
    if arr.min() < 0:
        img = img - float(arr.min())
    if mask is None:
        mask = ants.get_mask(img)
    return ants.n4_bias_field_correction(
        img, mask=mask, shrink_factor=shrink_factor,
        convergence={'iters': [50, 50, 50], 'tol': 1e-6})


def denoise(aimg, mask=None):
    """Adaptive non-local means denoising (ANTs ``DenoiseImage``, Rician noise model)."""
    import ants

    return ants.denoise_image(aimg, mask=mask, shrink_factor=1, p=1, r=2,
                              noise_model='Rician')


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Voxels above 5 % of the 99th percentile of the positive voxels."""
    positive = data[data > 0]
    if positive.size == 0:
        raise ValueError('Cannot find a foreground in an image without positive voxels.')
    return data > 0.05 * np.percentile(positive, 99)


def normalise_intensity(data: np.ndarray, mask: np.ndarray | None = None,
                        low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """Map the ``low`` and ``high`` percentiles of the foreground to 0 and 1 (clipped to [0, 2]).

    The foreground is ``mask`` or, when none is given, :func:`foreground_mask`. Background
    stays 0.
    """
    data = np.asarray(data, dtype=np.float32)
    if mask is None:
        mask = foreground_mask(data)
    values = data[mask]
    if values.size < 100:
        raise ValueError(f'The foreground has {values.size} voxels; too few to normalise.')
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        raise ValueError('The foreground intensities are constant; cannot normalise.')
    out = (data - lo) / (hi - lo)
    out[~mask] = 0.0
    return np.clip(out, 0.0, 2.0).astype(np.float32)


def masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` over ``mask`` (0 when either is constant)."""
    x = np.asarray(a, dtype=np.float64)[mask]
    y = np.asarray(b, dtype=np.float64)[mask]
    x -= x.mean()
    y -= y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0
