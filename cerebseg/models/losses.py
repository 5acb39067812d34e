"""Segmentation losses of the 3D cascade and the 2D brainstem networks.

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
3D trainer's choices. The scores (mean IoU) are in :mod:`cerebseg.models.metrics`.
"""
from __future__ import annotations

import functools

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
LOSSES = {'deepceres': DeepCeresLoss, 'dicece': DiceCELoss,
          'ce': functools.partial(SoftCELoss, smoothing=0.0)}

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
