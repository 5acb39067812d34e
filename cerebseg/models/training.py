"""Training of the DeepCeres segmentation networks on working-grid volumes (torch + NumPy only).

A :class:`Subject` holds one participant's volumes on the 0.5 mm working grid, cropped around
the cerebellum: T1w, optional T2w, the multi-atlas prior (per-class probabilities, uint8) and
the reference labels (class indices). :func:`stage_arrays` turns it into the network input and
target of a cascade stage (``hemisphere`` at ``spacing`` 1 mm, ``lobules`` at 0.5 mm).
:func:`train_segmentation` samples patches (biased to the cerebellum), augments them
(left-right flip with the left/right classes swapped, intensity, elastic), optimises, validates
every epoch, and calls back so that the command line can write resumable checkpoints.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from cerebseg.models.losses import LOSSES
from cerebseg.models.segmentation import SLAB
from cerebseg.utils import labels as lab
from cerebseg.utils.evaluation import dice_per_label

LOGGER = logging.getLogger(__name__)
STAGES = ('hemisphere', 'lobules')


@dataclass
class Subject:
    """One participant on the working grid (or a crop of it; ``x_mm``: x of each first-axis
    index, for the hemisphere split)."""

    name: str
    t1: np.ndarray                      # (X, Y, Z) float32, normalised intensities
    classes: np.ndarray                 # (X, Y, Z) uint8 class indices of ``labels``
    x_mm: np.ndarray                    # (X,)
    t2: np.ndarray | None = None        # (X, Y, Z) float32
    prior: np.ndarray | None = None     # (L, X, Y, Z) uint8, probability * 255

    def crop(self, box: tuple[slice, ...]) -> 'Subject':
        """The same participant inside ``box`` (three slices of the spatial axes; views)."""
        return Subject(self.name, self.t1[box], self.classes[box], self.x_mm[box[0]],
                       None if self.t2 is None else self.t2[box],
                       None if self.prior is None else self.prior[(slice(None),) + box])


def bounding_box(mask: np.ndarray, margin: int, even: bool = False) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (clipped), the whole
    volume for an empty mask; ``even``: every side even where the volume allows."""
    idx = np.argwhere(mask)
    if not len(idx):
        return tuple(slice(0, s) for s in mask.shape)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    if even:  # whole 2x2x2 blocks for a pooled stage: grow odd sides by one voxel
        odd = (hi - lo) % 2 == 1
        grow_hi = odd & (hi < mask.shape)
        hi = hi + grow_hi
        lo = lo - (odd & ~grow_hi & (lo > 0))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def crop_subject(subject: Subject, margin: int) -> Subject:
    """Crop to the bounding box of the labelled (or prior) cerebellum plus ``margin`` voxels,
    with even sides so that the 1 mm stage sees whole 2x2x2 blocks."""
    fg = subject.classes > 0
    if subject.prior is not None:
        fg |= subject.prior[0] < 128
    if not fg.any():
        raise ValueError(f'{subject.name}: no cerebellum in the labels or the prior')
    return subject.crop(bounding_box(fg, margin, even=True))


def _pool(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average over ``factor``^3 blocks of the last three axes (trailing voxels dropped)."""
    if factor == 1:
        return volume
    shape = volume.shape[-3:]
    t = torch.as_tensor(np.ascontiguousarray(volume, np.float32))
    t = t.reshape((-1, 1) + shape)
    out = F.avg_pool3d(t, factor).numpy()
    return out.reshape(volume.shape[:-3] + out.shape[-3:])


class Channels:
    """Network input channels, kept compact: the MR images (float16) then the prior (uint8,
    probability * 255). Indexing ``[:, x, y, z]`` and ``np.asarray`` give float32."""

    def __init__(self, mr: np.ndarray, prior: np.ndarray | None = None):
        self.mr = mr
        self.prior = prior

    @property
    def shape(self) -> tuple[int, ...]:
        n = len(self.mr) + (0 if self.prior is None else len(self.prior))
        return (n,) + self.mr.shape[1:]

    def __getitem__(self, index) -> np.ndarray:
        parts = [self.mr[index].astype(np.float32)]
        if self.prior is not None:
            parts.append(self.prior[index].astype(np.float32) / np.float32(255))
        return np.concatenate(parts)

    def channel(self, c: int) -> np.ndarray:
        """Channel ``c`` as float32, converted as :meth:`__getitem__` converts it."""
        n_mr = len(self.mr)
        if c < n_mr:
            return self.mr[c].astype(np.float32)
        return self.prior[c - n_mr].astype(np.float32) / np.float32(255)

    def __array__(self, dtype=None, copy=None):
        out = self[(slice(None),) * 4]
        return out if dtype is None else out.astype(dtype, copy=False)


def stage_arrays(subject: Subject, stage: str, inputs, labels: list, factor: int = 1):
    """Network input (:class:`Channels`, ``(C, X, Y, Z)``), target ``(X, Y, Z)`` uint8 and
    class labels of a cascade stage, at the working-grid spacing times ``factor``.

    ``hemisphere``: 3 classes (background, left, right cerebellum), prior channels = left and
    right probabilities; ``lobules``: the protocol's classes, prior channels = every foreground
    class.
    """
    inputs = list(inputs)
    if 'prior' in inputs and subject.prior is None:
        raise ValueError(f'{subject.name}: the prior channel was asked for but is missing')
    if stage == 'hemisphere':
        target = lab.hemisphere_classes(subject.classes, labels, subject.x_mm)
        stage_labels = lab.HEMISPHERE_LABELS
    elif stage == 'lobules':
        target, stage_labels = subject.classes, labels
    else:
        raise ValueError(f'stage must be one of {STAGES}, not {stage!r}')
    mr = []
    for name in inputs:
        if name == 'T1w':
            mr.append(subject.t1)
        elif name == 'T2w':
            if subject.t2 is None:
                raise ValueError(f'{subject.name}: the T2w channel was asked for but is missing')
            mr.append(subject.t2)
    mr = _pool(np.stack(mr).astype(np.float32), factor).astype(np.float16)
    prior = None
    if 'prior' in inputs:
        if stage == 'hemisphere':
            probs = lab.hemisphere_probs(subject.prior.astype(np.float32) / 255, labels,
                                         subject.x_mm)[1:]
            prior = np.rint(_pool(probs, factor) * 255).astype(np.uint8)
        elif factor > 1:
            prior = np.rint(_pool(subject.prior[1:].astype(np.float32), factor)).astype(np.uint8)
        else:
            prior = subject.prior[1:]
    if factor > 1:  # majority class of each block
        onehot = np.eye(len(stage_labels), dtype=np.float32)[target].transpose(3, 0, 1, 2)
        target = _pool(onehot, factor).argmax(0).astype(np.uint8)
    return Channels(mr, prior), np.ascontiguousarray(target), stage_labels


@dataclass
class Augment:
    """Patch augmentation settings (probabilities and ranges)."""

    flip: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.1
    noise: float = 0.03
    elastic: float = 0.3
    elastic_mm: float = 2.0
    spacing: float = 0.5


def flip_lr(image: np.ndarray, target: np.ndarray, perm: np.ndarray, n_mr: int):
    """Mirror a patch along x and swap left/right classes (and prior channels)."""
    image = image[:, ::-1]
    target = perm[target[::-1]].astype(target.dtype)
    if image.shape[0] > n_mr:  # prior channel c is class c + 1
        order = perm[1:] - 1
        image = np.concatenate([image[:n_mr], image[n_mr:][order]])
    return np.ascontiguousarray(image), np.ascontiguousarray(target)


def augment_patch(image, target, rng: np.random.Generator, aug: Augment, perm, n_mr: int):
    """Flip, intensity and elastic augmentation of one patch (MR channels are the first
    ``n_mr``; the prior channels only move with the geometry)."""
    from cerebseg.models import registration as reg

    if rng.random() < aug.flip:
        image, target = flip_lr(image, target, perm, n_mr)
    image = image.copy()
    for c in range(n_mr):
        ch = np.clip(image[c], 0, None) ** rng.uniform(*aug.gamma)
        ch = ch * rng.uniform(*aug.scale) + rng.uniform(-aug.shift, aug.shift)
        image[c] = ch + rng.normal(0, rng.uniform(0, aug.noise), ch.shape).astype(np.float32)
    if rng.random() < aug.elastic:
        v = reg.random_velocity(target.shape, aug.spacing, seed=int(rng.integers(1 << 30)),
                                max_mm=aug.elastic_mm)
        image = reg.random_deformation(image, v, aug.spacing)
        target = reg.random_deformation(target[None], v, aug.spacing, order=0)[0]
    return image.astype(np.float32), target


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


def pad_to(image: torch.Tensor, divisor: int):
    """Pad ``(N, C, X, Y, Z)`` at the end so that every side is a multiple of ``divisor``."""
    pads = []
    for s in reversed(image.shape[2:]):
        pads += [0, (-s) % divisor]
    return F.pad(image, pads), image.shape[2:]


def padded_input(image, divisor: int) -> torch.Tensor:
    """``(1, C, X', Y', Z')`` float32 of a ``(C, X, Y, Z)`` volume (an array or
    :class:`Channels`), zero-padded at the end to multiples of ``divisor``, filled channel by
    channel: one copy of the input, where converting then padding made three."""
    shape = tuple(image.shape[1:])
    padded = tuple(s + (-s) % divisor for s in shape)
    x = torch.zeros((1, image.shape[0]) + padded, dtype=torch.float32)
    inside = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    for c in range(image.shape[0]):
        plane = image.channel(c) if isinstance(image, Channels) \
            else np.asarray(image[c], np.float32)
        x[(0, c) + inside] = torch.from_numpy(plane)
    return x


def softmax_(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``torch.softmax`` over ``dim`` written into ``logits``, slab by slab along the first
    spatial axis (no second full-size tensor)."""
    for start in range(0, logits.shape[2], SLAB):
        part = logits[:, :, start:start + SLAB]
        part.copy_(torch.softmax(part, dim))
    return logits


@torch.inference_mode()
def predict(model, image: np.ndarray, *, device='cpu', roi: int = 128, overlap: float = 0.25,
            bf16: bool = False) -> torch.Tensor:
    """Class probabilities ``(L, X, Y, Z)`` (float32, CPU) of one ``(C, X, Y, Z)`` volume,
    by sliding windows of ``roi`` voxels (Gaussian-weighted, MONAI) where it is larger; a
    volume that fits in one window goes through the network once, its softmax in place."""
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    model.eval()
    div = getattr(model, 'divisor', 1)
    shape = tuple(image.shape[1:])
    x = padded_input(image, div).to(device)
    window = roi - roi % div
    use_bf16 = bf16 or device.type == 'cuda'

    def forward(patch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return model(patch)

    if all(s <= window for s in x.shape[2:]):
        logits = forward(x)
        del x
        out = softmax_(logits.float())
    else:
        roi_size = [min(window, s) for s in x.shape[2:]]
        out = sliding_window_inference(x, roi_size, 1, lambda p: torch.softmax(
            forward(p).float(), 1), overlap=overlap, mode='gaussian')
    out = out[0, :, :shape[0], :shape[1], :shape[2]].float().cpu()
    # a copy without the padding: a view would keep the whole padded tensor alive
    return out if out.is_contiguous() else out.contiguous()


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
    augment = augment or Augment()
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
