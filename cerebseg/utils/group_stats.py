"""Group statistics of the volume tables: robust z-scores, outliers, left/right asymmetry.

Plain NumPy on arrays (no file I/O, no nipype); ``cerebseg.bids_app.group`` reads the tables
and writes the results.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np

#: |robust z| above which a volume is an outlier (Iglewicz and Hoaglin's modified z-score rule)
OUTLIER_Z = 3.5
#: fewer values than this in a column flag no outlier: the MAD of 3 or 4 values is too unstable
#: (with 3, one value is often 10 or 20 robust z from the median by chance)
MIN_OUTLIER_N = 5
#: structures whose median volume is below this (mm^3) flag no outlier: a few voxels swing their
#: z-scores (the vermis of Crus I, the fastigial nuclei, the locus coeruleus)
MIN_OUTLIER_VOLUME_MM3 = 100.0
#: MAD -> standard deviation of a normal distribution (1 / Phi^-1(3/4))
MAD_TO_SD = 1.4826
#: the name prefixes of the two sides of a paired structure
LEFT, RIGHT = 'Left_', 'Right_'


def robust_z(values, axis: int = 0) -> np.ndarray:
    """Robust z-scores: ``(x - median) / (1.4826 * MAD)``, per column.

    NaN (and inf) values are ignored in the median and MAD and get a NaN z. Where the MAD is 0
    (more than half of the values equal) the sample standard deviation is the scale instead;
    where that is 0 or undefined too (all values equal, or a single value), the values equal to
    the median get z = 0 and the others NaN.

    Parameters
    ----------
    values : array_like
        ``(N,)`` or ``(N, K)``: N observations of K variables (e.g. participants x structures).
    axis : int
        The axis of the observations.

    Returns
    -------
    numpy.ndarray
        float64, the shape of ``values``.
    """
    x = np.asarray(values, dtype=float).copy()
    x[~np.isfinite(x)] = np.nan
    with warnings.catch_warnings(), np.errstate(invalid='ignore', divide='ignore'):
        warnings.simplefilter('ignore', RuntimeWarning)  # all-NaN columns, one value
        centre = np.nanmedian(x, axis=axis, keepdims=True)
        scale = MAD_TO_SD * np.nanmedian(np.abs(x - centre), axis=axis, keepdims=True)
        n = np.sum(np.isfinite(x), axis=axis, keepdims=True)
        sd = np.where(n > 1, np.nanstd(x, axis=axis, ddof=1, keepdims=True), np.nan)
        scale = np.where(scale > 0, scale, sd)
        ok = np.isfinite(scale) & (scale > 0)
        z = np.where(ok, (x - centre) / np.where(ok, scale, 1.0),
                     np.where(x == centre, 0.0, np.nan))
    return z


def outliers(z, threshold: float = OUTLIER_Z, min_n: int = 1, axis: int = 0) -> np.ndarray:
    """``|z| > threshold`` (NaN is never an outlier); a bool array of the shape of ``z``.

    ``min_n``: columns (along ``axis``) with fewer finite z-scores flag nothing (use
    ``MIN_OUTLIER_N`` for z-scores from :func:`robust_z`).
    """
    z = np.asarray(z, dtype=float)
    finite = np.isfinite(z)
    enough = finite.sum(axis=axis, keepdims=z.ndim > 0) >= min_n
    return finite & (np.abs(np.where(finite, z, 0.0)) > threshold) & enough


def asymmetry_index(left, right) -> np.ndarray:
    """Left/right asymmetry index ``AI = (L - R) / ((L + R) / 2)``, element-wise.

    Positive when the left structure is larger; NaN where either side is NaN or both are 0.
    The index has no unit (0.1 is a 10 % difference relative to the mean of the two sides) and
    is the same whether volumes are raw or normalised by the intracranial volume.

    Parameters
    ----------
    left, right : array_like
        Volumes of the left and right structure (broadcastable shapes).

    Returns
    -------
    numpy.ndarray
        float64, the broadcast shape.
    """
    left = np.asarray(left, dtype=float)
    right = np.asarray(right, dtype=float)
    mean = (left + right) / 2.0
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(mean != 0, (left - right) / np.where(mean != 0, mean, 1.0), np.nan)


def pair_structures(names: Iterable[str]) -> list[tuple[str, str, str]]:
    """The left/right pairs among structure names: ``(base, 'Left_<base>', 'Right_<base>')``
    for every ``Left_<base>`` whose ``Right_<base>`` is also in ``names``, in the order of the
    left names (``Vermis_VI``, ``Midbrain_GM`` or a side without its twin are not paired)."""
    names = list(names)
    present = set(names)
    return [(n[len(LEFT):], n, RIGHT + n[len(LEFT):]) for n in names
            if n.startswith(LEFT) and len(n) > len(LEFT) and RIGHT + n[len(LEFT):] in present]
