"""Training of the DeepCeres segmentation networks on working-grid volumes (torch + NumPy only).

A :class:`Subject` holds one participant's volumes on the 0.5 mm working grid, cropped around
the cerebellum: T1w, optional T2w, the multi-atlas prior (per-class probabilities, uint8) and
the reference labels (class indices). :func:`stage_arrays` turns it into the network input (the
pipeline's own, :func:`cerebseg.models.cascade.stage_channels`) and the target of a cascade
stage (``hemisphere`` at ``spacing`` 1 mm, ``lobules`` at 0.5 mm). :func:`train_segmentation`
samples patches (biased to the cerebellum), augments them (:meth:`cerebseg.training.augment.
Augment.patches`: left-right flip with the left/right classes swapped, intensity, elastic),
optimises, validates every epoch with the pipeline's predictor
(:func:`cerebseg.models.inference.predict`), and calls back so that the command line can write
resumable checkpoints. :func:`transfer_weights` starts a network from one trained on other
inputs (``--init``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from cerebseg.models.cascade import Volumes, bounding_box, pool, stage_channels
from cerebseg.models.checkpoint import CheckpointError
from cerebseg.models.inference import predict
from cerebseg.models.losses import LOSSES
from cerebseg.models.nets3d import check_inputs
from cerebseg.training.augment import Augment, augment_patch
from cerebseg.utils import labels as lab
from cerebseg.utils.evaluation import dice_per_label

LOGGER = logging.getLogger(__name__)


@dataclass
class Subject(Volumes):
    """One participant's input volumes on the working grid (or a crop of it), as the pipeline
    has them (:class:`cerebseg.models.cascade.Volumes`), and its reference labels."""

    classes: np.ndarray = field(kw_only=True)   # (X, Y, Z) uint8 class indices of ``labels``

    def crop(self, box: tuple[slice, ...]) -> 'Subject':
        """The same participant inside ``box`` (three slices of the spatial axes; views)."""
        return replace(super().crop(box), classes=self.classes[box])


def crop_subject(subject: Subject, margin: int) -> Subject:
    """Crop to the bounding box of the labelled (or prior) cerebellum plus ``margin`` voxels,
    with even sides so that the 1 mm stage sees whole 2x2x2 blocks."""
    fg = subject.classes > 0
    if subject.prior is not None:
        fg |= subject.prior[0] < 128
    if not fg.any():
        raise ValueError(f'{subject.name}: no cerebellum in the labels or the prior')
    return subject.crop(bounding_box(fg, margin, even=True))


def stage_arrays(subject: Subject, stage: str, inputs, labels: list, factor: int = 1):
    """Network input (:class:`~cerebseg.models.inference.Channels`, ``(C, X, Y, Z)``), target
    ``(X, Y, Z)`` uint8 and class labels of a cascade stage, at the working-grid spacing times
    ``factor``: the input as the pipeline makes it (:func:`cerebseg.models.cascade.
    stage_channels`), the target from the reference classes.

    ``hemisphere``: 3 classes (background, left, right cerebellum); ``lobules``: the
    protocol's classes.
    """
    channels = stage_channels(subject, stage, inputs, labels, factor)
    if stage == 'hemisphere':
        target = lab.hemisphere_classes(subject.classes, labels, subject.x_mm)
        stage_labels = lab.HEMISPHERE_LABELS
    else:
        target, stage_labels = subject.classes, labels
    if factor > 1:  # majority class of each block
        onehot = np.eye(len(stage_labels), dtype=np.float32)[target].transpose(3, 0, 1, 2)
        target = pool(onehot, factor).argmax(0).astype(np.uint8)
    return channels, np.ascontiguousarray(target), stage_labels


def sample_patch(image: np.ndarray, target: np.ndarray, size, rng: np.random.Generator,
                 foreground: float = 0.67):
    """A ``size`` patch (zero-padded where the volume is smaller), centred on a random
    foreground voxel with probability ``foreground``, else anywhere."""
    size = np.asarray(size)
    shape = np.asarray(target.shape)
    fg = np.argwhere(target > 0) if rng.random() < foreground else ()
    if len(fg):
        centre = fg[rng.integers(len(fg))]
        start = centre - size // 2 + rng.integers(-size // 4, size // 4 + 1)
    else:
        start = np.array([rng.integers(min(0, s - p), max(0, s - p) + 1)
                          for s, p in zip(shape, size)])
    start = np.clip(start, np.minimum(0, shape - size), np.maximum(0, shape - size))
    out_img = np.zeros((image.shape[0],) + tuple(size), np.float32)
    out_tgt = np.zeros(tuple(size), target.dtype)
    src = tuple(slice(max(a, 0), min(a + p, s)) for a, p, s in zip(start, size, shape))
    dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, start))
    out_img[(slice(None),) + dst] = image[(slice(None),) + src]
    out_tgt[dst] = target[src]
    return out_img, out_tgt


@dataclass
class TrainState:
    """Everything needed to resume: counters, history, RNG states, optimiser state."""

    epoch: int = 0
    step: int = 0
    best: float = -1.0
    history: list = field(default_factory=list)
    rng: dict | None = None
    torch_rng: torch.Tensor | None = None
    optimiser: dict | None = None


def train_segmentation(model, train: list, validation: list, *, labels: list, n_mr: int,
                       epochs: int, steps_per_epoch: int, patch: int, batch: int = 2,
                       lr: float = 1e-3, loss: str = 'deepceres', seed: int = 0,
                       device='cpu', augment: Augment | None = None, bf16: bool = False,
                       state: TrainState | None = None, on_epoch=None) -> TrainState:
    """Train ``model`` on ``(image, target)`` pairs (from :func:`stage_arrays`).

    ``validation`` pairs are segmented whole (sliding windows) after each epoch; the score is
    the mean Dice over foreground classes. ``on_epoch(model, state, improved)`` is called after
    each epoch (write checkpoints there). Pass the returned/saved ``state`` to resume: the
    RNG and optimiser states make a resumed run equal to an uninterrupted one.
    """
    device = torch.device(device)
    model.to(device)
    augment = augment or Augment.patches()
    perm = lab.swap_classes(labels)
    criterion = LOSSES[loss]()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    state = state or TrainState()
    rng = np.random.default_rng(seed)
    if state.rng is not None:
        rng.bit_generator.state = state.rng
    if state.torch_rng is not None:
        torch.set_rng_state(state.torch_rng)
    else:
        torch.manual_seed(seed)
    if state.optimiser is not None:
        opt.load_state_dict(state.optimiser)
    use_bf16 = bf16 or device.type == 'cuda'
    while state.epoch < epochs:
        t0 = time.time()
        model.train()
        losses = []
        for _ in range(steps_per_epoch):
            imgs, tgts = [], []
            for _ in range(batch):
                img, tgt = sample_patch(*train[int(rng.integers(len(train)))], (patch,) * 3,
                                        rng)
                img, tgt = augment_patch(img, tgt, rng, augment, perm, n_mr)
                imgs.append(img)
                tgts.append(tgt)
            x = torch.as_tensor(np.stack(imgs)).to(device)
            y = torch.as_tensor(np.stack(tgts).astype(np.int64)).to(device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(x)
            value = criterion(out.float(), y)
            value.backward()
            opt.step()
            losses.append(float(value.detach()))
            state.step += 1
        scores = []
        for img, tgt in validation:
            probs = predict(model, img, device=device, roi=max(patch, 160), bf16=bf16)
            scores.append(np.nanmean(dice_per_label(probs.argmax(0).numpy(), tgt,
                                                    range(1, len(labels)))))
        score = float(np.mean(scores)) if scores else float('nan')
        state.epoch += 1
        state.history.append({'epoch': state.epoch, 'step': state.step,
                              'loss': float(np.mean(losses)), 'validation_dice': score,
                              'seconds': round(time.time() - t0, 1)})
        improved = not scores or score > state.best
        if improved and scores:
            state.best = score
        state.rng = rng.bit_generator.state
        state.torch_rng = torch.get_rng_state()
        state.optimiser = opt.state_dict()
        LOGGER.info('epoch %d/%d (step %d): loss %.4f, validation Dice %.4f, %.0f s',
                    state.epoch, epochs, state.step, np.mean(losses), score, time.time() - t0)
        if on_epoch:
            on_epoch(model, state, improved)
    return state


def _channel_names(inputs, n_prior: int) -> list[str]:
    names = []
    for name in check_inputs(inputs):
        names += [f'prior{i}' for i in range(n_prior)] if name == 'prior' else [name]
    return names


def transfer_weights(ckpt: dict, model: nn.Module, inputs, n_prior: int) -> list[str]:
    """Start ``model`` (built for ``inputs``) from a checkpoint trained on other inputs.

    Layers whose input channels differ (those that see the network input: the U-Net's first
    convolution, every DPN block) keep the weights of the channels both input sets have; a
    channel only the new set has (e.g. T2w) starts at zero, so the new network first computes
    what the old one did. Returns the names of the adapted parameters.
    """
    old = _channel_names(ckpt['inputs'], n_prior)
    new = _channel_names(inputs, n_prior)
    state = {k: v.float() for k, v in ckpt['state_dict'].items()}
    target = model.state_dict()
    if set(state) != set(target):
        raise CheckpointError('the checkpoint does not have the architecture of the new network')
    adapted = []
    for key, value in target.items():
        src = state[key]
        if src.shape == value.shape:
            continue
        extra = src.shape[1] - len(old)
        if value.dim() < 2 or extra < 0 or value.shape[1] - len(new) != extra:
            raise CheckpointError(f'{key}: shapes {tuple(src.shape)} and {tuple(value.shape)} '
                                  'differ by more than the input channels')
        out = torch.zeros_like(value)
        for j, name in enumerate(new):
            if name in old:
                out[:, j] = src[:, old.index(name)]
        out[:, len(new):] = src[:, len(old):]
        state[key] = out
        adapted.append(key)
    model.load_state_dict(state, strict=True)
    return adapted
