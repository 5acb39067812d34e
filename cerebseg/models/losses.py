"""Segmentation losses and the overlap metric of the 2D brainstem networks.

Every loss takes logits ``(N, L, ...)`` (2D or 3D) and integer targets ``(N, ...)`` (class
indices), applies the softmax itself and returns a scalar.

* :class:`DeepCeresLoss`: DeepCeres' equation (1).
* :class:`DiceLoss`, :class:`JaccardLoss`: one minus the soft Dice / soft IoU per class of the
  softmax probabilities, pooled over the batch and the pixels, averaged over the classes
  (MONAI ``DiceLoss`` with ``batch=True``, as smp's multiclass ``DiceLoss`` pools the batch;
  unlike smp's, a class absent from the batch's target still counts: 0 if it is not predicted
  either, up to 1 if it is).
* :class:`FocalLoss`: softmax focal loss, ``-(1 - p_t)**gamma * log(p_t)`` averaged over the
  pixels and classes (MONAI ``FocalLoss(use_softmax=True)``).
* :class:`SoftCELoss`: cross-entropy against label-smoothed targets (``smoothing`` of the mass
  spread evenly over the classes); its minimum is the entropy of the smoothed target, not 0.
* :class:`DiceFocalLoss`: ``lambda_dice * Dice + lambda_focal * Focal`` with the softmax focal
  loss above (MONAI's ``DiceFocalLoss`` applies a sigmoid focal loss to each class instead).
* :class:`DiceCELoss`: ``alpha * Dice + (1 - alpha) * CE``: ``alpha`` weights the Dice side, so
  the paper's "DiceCE alpha = 0.1" is read as 0.1 Dice + 0.9 cross-entropy. Without ``alpha``
  it is the sum ``Dice + CE`` that the 3D trainer has always used.

:func:`build_loss` makes any of them by name (:data:`ALL_LOSSES`); :data:`LOSSES` stays the
3D trainer's choices. :func:`mean_iou` is the macro mean IoU of the N-DecoNet paper and
:func:`t_confidence_interval` the 95 % interval of a score over repeated runs.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-class soft Dice over the batch and all voxels, shape ``(L,)``."""
    dims = (0,) + tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    return (2 * inter + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)


def _onehot(target: torch.Tensor, n: int, dtype) -> torch.Tensor:
    return F.one_hot(target.long(), n).movedim(-1, 1).to(dtype)


class DeepCeresLoss(nn.Module):
    """``log(((1 - mean_c Dice_c) + BCE) / 2)`` (DeepCeres, equation 1).

    Dice is the soft Dice of the softmax probabilities per class, averaged over the classes;
    BCE the binary cross-entropy between those probabilities and the one-hot target, averaged
    over classes and voxels. The log makes the gradient grow as the loss shrinks.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        probs = torch.softmax(logits, 1)
        onehot = _onehot(target, logits.shape[1], probs.dtype)
        dice = soft_dice(probs, onehot).mean()
        bce = F.binary_cross_entropy(probs.clamp(self.eps, 1 - self.eps), onehot)
        return torch.log(((1 - dice) + bce).clamp_min(self.eps) / 2)


class _MonaiLoss(nn.Module):
    """Calls a MONAI loss on float logits and ``(N, 1, ...)`` integer targets."""

    loss: nn.Module

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), target[:, None].long())


def _check_weight(name: str, value: float, upper: float | None = None) -> None:
    if value < 0 or (upper is not None and value > upper):
        raise ValueError(f'{name} must be in [0, {upper if upper is not None else "inf"}], '
                         f'got {value}')


class DiceCELoss(_MonaiLoss):
    """``alpha * (1 - mean_c Dice_c) + (1 - alpha) * cross-entropy`` (MONAI's DiceCELoss with
    softmax); ``alpha=None`` gives the plain sum ``(1 - mean_c Dice_c) + cross-entropy``."""

    def __init__(self, alpha: float | None = None, label_smoothing: float = 0.0):
        super().__init__()
        from monai.losses import DiceCELoss as _MonaiDiceCE

        if alpha is not None:
            _check_weight('alpha', alpha, 1.0)
        _check_weight('label_smoothing', label_smoothing, 1.0)
        self.alpha = alpha
        dice, ce = (1.0, 1.0) if alpha is None else (float(alpha), 1.0 - float(alpha))
        self.loss = _MonaiDiceCE(to_onehot_y=True, softmax=True, batch=True, lambda_dice=dice,
                                 lambda_ce=ce, label_smoothing=label_smoothing)


class DiceLoss(_MonaiLoss):
    """``1 - mean_c Dice_c`` of the softmax probabilities (``jaccard``: soft IoU instead)."""

    def __init__(self, include_background: bool = True, jaccard: bool = False):
        super().__init__()
        from monai.losses import DiceLoss as _MonaiDice

        self.loss = _MonaiDice(include_background=include_background, to_onehot_y=True,
                               softmax=True, batch=True, jaccard=jaccard)


class JaccardLoss(DiceLoss):
    """``1 - mean_c IoU_c`` (soft Jaccard, ``I / (P + G - I)``) of the softmax probabilities."""

    def __init__(self, include_background: bool = True):
        super().__init__(include_background=include_background, jaccard=True)


class FocalLoss(_MonaiLoss):
    """Softmax focal loss ``-(1 - p_t)**gamma * log(p_t)``, mean over pixels and classes."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        from monai.losses import FocalLoss as _MonaiFocal

        _check_weight('gamma', gamma)
        self.loss = _MonaiFocal(to_onehot_y=True, use_softmax=True, gamma=gamma)


class SoftCELoss(nn.Module):
    """Cross-entropy with label smoothing: the target keeps ``1 - smoothing`` on its class and
    spreads ``smoothing`` evenly over all classes (``torch.nn.functional.cross_entropy``)."""

    def __init__(self, smoothing: float = 0.1):
        super().__init__()
        _check_weight('smoothing', smoothing, 1.0)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target.long(), label_smoothing=self.smoothing)


class DiceFocalLoss(nn.Module):
    """``lambda_dice * (1 - mean_c Dice_c) + lambda_focal * softmax focal loss``."""

    def __init__(self, lambda_dice: float = 1.0, lambda_focal: float = 1.0, gamma: float = 2.0):
        super().__init__()
        _check_weight('lambda_dice', lambda_dice)
        _check_weight('lambda_focal', lambda_focal)
        self.lambda_dice, self.lambda_focal = lambda_dice, lambda_focal
        self.dice = DiceLoss()
        self.focal = FocalLoss(gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.lambda_dice * self.dice(logits, target)
                + self.lambda_focal * self.focal(logits, target))


#: the 3D trainer's choices (``cerebseg-train segmentation --loss``)
LOSSES = {'deepceres': DeepCeresLoss, 'dicece': DiceCELoss}

#: every loss by name (:func:`build_loss`)
ALL_LOSSES = {**LOSSES, 'dice': DiceLoss, 'jaccard': JaccardLoss, 'focal': FocalLoss,
              'softce': SoftCELoss, 'dicefocal': DiceFocalLoss}


def build_loss(name: str, **kw) -> nn.Module:
    """A loss of :data:`ALL_LOSSES` by name, e.g. ``build_loss('dicece', alpha=0.1)``."""
    try:
        cls = ALL_LOSSES[name]
    except KeyError:
        raise ValueError(f'unknown loss {name!r}; choose one of {sorted(ALL_LOSSES)}') from None
    return cls(**kw)


# ---------------------------------------------------------------------------------- metric

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
