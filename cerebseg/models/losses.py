"""Segmentation losses: DeepCeres' equation (1) and Dice + cross-entropy.

Both take logits ``(N, L, ...)`` and integer targets ``(N, ...)`` (class indices).
"""
from __future__ import annotations

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


class DiceCELoss(nn.Module):
    """``(1 - mean_c Dice_c) + cross-entropy`` (MONAI's DiceCELoss with softmax)."""

    def __init__(self):
        super().__init__()
        from monai.losses import DiceCELoss as _MonaiDiceCE

        self.loss = _MonaiDiceCE(to_onehot_y=True, softmax=True, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), target[:, None].long())


LOSSES = {'deepceres': DeepCeresLoss, 'dicece': DiceCELoss}
