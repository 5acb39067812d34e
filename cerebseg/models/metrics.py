"""Scores of segmentations: per-class IoU counts that add up over batches, the macro mean
IoU (the N-DecoNet paper's metric), and the Student-t interval of repeated runs' scores.

NumPy (torch tensors are accepted as input); the Dice of whole volumes is in
:mod:`cerebseg.utils.evaluation`.
"""
from __future__ import annotations

import numpy as np
import torch


def _labels_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def iou_counts(pred, ref, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class intersection and union pixel counts of two label maps of one shape.

    ``pred`` and ``ref`` hold class indices in ``[0, n_classes)`` (NumPy or torch, any shape).
    Counts of several batches add up, so a data set's IoU can be accumulated batch by batch.
    """
    pred, ref = _labels_array(pred), _labels_array(ref)
    if pred.shape != ref.shape:
        raise ValueError(f'prediction {pred.shape} and reference {ref.shape} differ in shape')
    for name, x in (('prediction', pred), ('reference', ref)):
        if x.size and (x.min() < 0 or x.max() >= n_classes):
            raise ValueError(f'{name} holds labels outside [0, {n_classes}): '
                             f'{x.min()}..{x.max()}')
    pred, ref = pred.ravel().astype(np.int64), ref.ravel().astype(np.int64)
    inter = np.bincount(ref[pred == ref], minlength=n_classes)
    union = (np.bincount(pred, minlength=n_classes) + np.bincount(ref, minlength=n_classes)
             - inter)
    return inter, union


def iou_from_counts(inter, union, labels=None) -> float:
    """Macro mean IoU of :func:`iou_counts` over ``labels`` (default: every class, background
    included), skipping the labels absent from both prediction and reference (union 0).
    NaN when every label is absent."""
    inter, union = np.asarray(inter, float), np.asarray(union, float)
    idx = np.arange(len(union)) if labels is None else np.asarray(list(labels), int)
    if idx.size and (idx.min() < 0 or idx.max() >= len(union)):
        raise ValueError(f'labels {idx.tolist()} outside [0, {len(union)})')
    present = idx[union[idx] > 0]
    if not present.size:
        return float('nan')
    return float(np.mean(inter[present] / union[present]))


def mean_iou(pred, ref, n_classes: int, labels=None) -> float:
    """Macro mean IoU: per label ``|P & R| / |P | R|`` from the pixels of all the slices given
    (pooled, as smp's ``iou_score(reduction='macro')``), then the unweighted mean over
    ``labels``.

    ``labels=None`` averages every class including the background (the paper's macro mIoU, smp's
    default); pass a subset (the nuclei, or grey and white matter) for a partial mean. A label
    absent from both prediction and reference is skipped (smp would score it 1); NaN if all are.
    """
    return iou_from_counts(*iou_counts(pred, ref, n_classes), labels)


def t_confidence_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student-t interval of the mean of repeated runs' scores,
    ``mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n)`` with the sample standard deviation ``s``."""
    from scipy import stats

    x = np.asarray(values, float).ravel()
    if x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f'a confidence interval needs at least 2 finite values, got {x.tolist()}')
    if not 0 < level < 1:
        raise ValueError(f'level must be in (0, 1), got {level}')
    mean = float(x.mean())
    half = float(stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half
