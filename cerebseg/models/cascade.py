"""DeepCeres cascade inference: hemisphere stage, then the lobule stage inside its mask.

Each stage may hold several networks (U-Net, DPN): their class probabilities are averaged
(the ensemble), and their voxelwise disagreement, the total-variation distance
``0.5 * sum_c |p_i(c) - p_j(c)|`` averaged over pairs of networks (0: identical
probabilities, 1: disjoint), is the uncertainty map. Its mean over the voxels of each label is
the per-label uncertainty reported with the volumes.

Steps, on the 0.5 mm working grid:

1. region: the prior's cerebellum (probability of background < 0.5) plus ``roi_margin_mm``, or
   the whole grid without a prior;
2. hemisphere stage at its checkpoint's spacing (1 mm): background / left / right;
3. lobule stage at 0.5 mm in the bounding box of the hemisphere mask dilated by
   ``mask_margin_mm``; voxels outside that dilated mask are background.

What the lobule networks decide (``role``, from the weights manifest): ``labels`` (every class,
DeepCeres), or ``outline`` (:func:`outline_role`): the networks say where the cerebellum ends,
the prior which lobule each voxel is. CERES-protocol networks trained on two individual
anatomies move the cerebellum's outline towards the image on an unseen map but not its lobule
borders (README, Accuracy); the T1w+T2w one ships with that role (MODEL_CARD_cobra.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from cerebseg.models.checkpoint import ROLES, CheckpointError, load_cascade_net
from cerebseg.models.inference import Channels, predict
from cerebseg.models.nets3d import SLAB
from cerebseg.utils import labels as lab

LOGGER = logging.getLogger(__name__)
GRID_SPACING = 0.5
#: the stages of the cascade, in order
STAGES = ('hemisphere', 'lobules')


@dataclass
class Volumes:
    """One participant's input volumes on the working grid, or a crop of it (``x_mm``: x of
    each first-axis index, for the hemisphere split)."""

    name: str
    t1: np.ndarray                      # (X, Y, Z) float32, normalised intensities
    x_mm: np.ndarray                    # (X,)
    t2: np.ndarray | None = None        # (X, Y, Z) float32
    prior: np.ndarray | None = None     # (L, X, Y, Z) uint8, probability * 255

    def crop(self, box: tuple[slice, ...]):
        """The same volumes inside ``box`` (three slices of the spatial axes; views), of the
        same class (a subclass's own fields are cropped by its own ``crop``)."""
        return replace(self, t1=self.t1[box], x_mm=self.x_mm[box[0]],
                       t2=None if self.t2 is None else self.t2[box],
                       prior=None if self.prior is None else self.prior[(slice(None),) + box])


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


def pool(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average over ``factor``^3 blocks of the last three axes (trailing voxels dropped)."""
    if factor == 1:
        return volume
    shape = volume.shape[-3:]
    t = torch.as_tensor(np.ascontiguousarray(volume, np.float32))
    t = t.reshape((-1, 1) + shape)
    out = F.avg_pool3d(t, factor).numpy()
    return out.reshape(volume.shape[:-3] + out.shape[-3:])


def stage_channels(volumes, stage: str, inputs, labels: list, factor: int = 1) -> Channels:
    """Network input (:class:`~cerebseg.models.inference.Channels`, ``(C, X, Y, Z)``) of a
    cascade stage, at the working-grid spacing times ``factor``, from ``volumes`` (a
    :class:`Volumes`, or anything with its attributes: the trainers' subjects).

    The MR channels (``inputs``: ``T1w``, ``T2w``) are block-averaged and stored as float16;
    the prior channels are, for ``hemisphere``, the left and right cerebellum probabilities,
    for ``lobules``, every foreground class (uint8, probability * 255).
    """
    inputs = list(inputs)
    if stage not in STAGES:
        raise ValueError(f'stage must be one of {STAGES}, not {stage!r}')
    if 'prior' in inputs and volumes.prior is None:
        raise ValueError(f'{volumes.name}: the prior channel was asked for but is missing')
    mr = []
    for name in inputs:
        if name == 'T1w':
            mr.append(volumes.t1)
        elif name == 'T2w':
            if volumes.t2 is None:
                raise ValueError(f'{volumes.name}: the T2w channel was asked for but is missing')
            mr.append(volumes.t2)
    mr = pool(np.stack(mr).astype(np.float32), factor).astype(np.float16)
    prior = None
    if 'prior' in inputs:
        if stage == 'hemisphere':
            probs = lab.hemisphere_probs(volumes.prior.astype(np.float32) / 255, labels,
                                         volumes.x_mm)[1:]
            prior = np.rint(pool(probs, factor) * 255).astype(np.uint8)
        elif factor > 1:
            prior = np.rint(pool(volumes.prior[1:].astype(np.float32), factor)).astype(np.uint8)
        else:
            prior = volumes.prior[1:]
    return Channels(mr, prior)


@dataclass
class CascadeResult:
    classes: np.ndarray        # (X, Y, Z) uint8 class indices of ``labels``
    probseg: np.ndarray        # (X, Y, Z, L) uint8 ensemble probabilities (1/255 steps)
    disagreement: np.ndarray   # (X, Y, Z) float32 in [0, 1]
    hemisphere: np.ndarray     # (X, Y, Z) uint8: 0 background, 1 left, 2 right
    labels: list               # [index, name] of each class
    members: list | None = None  # per lobule network: its own (X, Y, Z) classes (on request)

    def label_uncertainty(self) -> np.ndarray:
        """Mean disagreement over the voxels of each class (NaN where a class is absent)."""
        return label_uncertainty(self.classes, self.disagreement, len(self.labels))


def load_models(paths, *, inputs, stage: str, protocol: str, device='cpu',
                labels: list | None = None, lut: str = '') -> list:
    """``[(model, meta), ...]`` of the checkpoints of one stage, checked against the run:
    their inputs, stage and protocol, one label table for all of them and, with ``labels``
    (``[index, name]`` of the run's lookup table ``lut``), that one. A mismatch is a
    :class:`~cerebseg.models.checkpoint.CheckpointError` (exit 126) that names the files."""
    models = [load_cascade_net(p, inputs=inputs, stage=stage, protocol=protocol, device=device)
              for p in paths]
    tables = [m[1]['labels'] for m in models]
    files = ', '.join(map(str, paths))
    if any(lb != tables[0] for lb in tables):
        raise CheckpointError(f'the {stage} networks {files} were trained on different label '
                              'tables; use checkpoints of one training set (one weights '
                              'manifest, --cnn-weights)')
    if labels is not None and [list(lb) for lb in tables[0]] != [list(lb) for lb in labels]:
        raise CheckpointError(f'the {stage} networks {files} were trained on another label '
                              f'table than the lookup table of the run ({lut or "given"}); use '
                              "weights trained on this atlas library's labels (`cerebseg-train "
                              "segmentation --atlas-library ...`, then --cnn-weights) or the "
                              '--atlas-library they were trained on')
    return models


def ensemble(probs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean probabilities and the mean pairwise total-variation distance of ``(L, ...)``.

    The mean is accumulated into ``probs[0]`` (the list's tensors are the caller's to drop)
    and the distances slab by slab: no stack of all members, no full-size temporaries.
    """
    dis = torch.zeros(probs[0].shape[1:])
    pairs = 0
    for i in range(len(probs)):
        for j in range(i + 1, len(probs)):
            for start in range(0, dis.shape[0], SLAB):
                part = slice(start, start + SLAB)
                dis[part] += 0.5 * (probs[i][:, part] - probs[j][:, part]).abs().sum(0)
            pairs += 1
    mean = probs[0]
    for other in probs[1:]:
        mean += other
    if len(probs) > 1:
        mean /= len(probs)
    return mean, dis / max(pairs, 1)


def outline_role(probs: torch.Tensor, prior: np.ndarray) -> torch.Tensor:
    """The networks' outline with the prior's lobules, in place: the background probability
    stays the networks' (``probs (L, ...)``, float), the foreground ``1 - p(background)`` is
    shared among the classes as the prior shares its own foreground (``prior (L, ...)``, uint8
    probabilities of the same classes); where the prior has no foreground at all, as the
    networks share it."""
    fg = probs[1:]
    for start in range(0, fg.shape[1], SLAB):
        part = slice(start, start + SLAB)
        p = torch.as_tensor(prior[1:, part], dtype=probs.dtype)
        mass = p.sum(0, keepdim=True)
        share = torch.where(mass > 0, p / mass.clamp_min(1e-6),
                            fg[:, part] / fg[:, part].sum(0, keepdim=True).clamp_min(1e-12))
        fg[:, part] = share * (1 - probs[0, part])[None]
    return probs


def label_uncertainty(classes: np.ndarray, disagreement: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount(classes.ravel(), minlength=n)[:n].astype(np.float64)
    sums = np.bincount(classes.ravel(), weights=disagreement.ravel(), minlength=n)[:n]
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _stage_probs(models, volumes: Volumes, stage: str, labels: list, out_shape, device,
                 roi: int, bf16: bool) -> list[torch.Tensor]:
    probs = []
    for model, meta in models:
        factor = int(round(meta['spacing'] / GRID_SPACING))
        image = stage_channels(volumes, stage, meta['inputs'], labels, factor)
        p = predict(model, image, device=device, roi=roi, bf16=bf16)
        if tuple(p.shape[1:]) != tuple(out_shape):
            p = F.interpolate(p[None], size=tuple(out_shape), mode='trilinear',
                              align_corners=False)[0]
        probs.append(p)
    return probs


@torch.inference_mode()
def run_cascade(t1: np.ndarray, *, labels: list, x_mm: np.ndarray, hemisphere_models: list,
                lobule_models: list, t2: np.ndarray | None = None,
                prior: np.ndarray | None = None, device='cpu', roi: int = 256,
                roi_margin_mm: float = 12.0, mask_margin_mm: float = 3.0,
                bf16: bool = False, members: bool = False,
                role: str = 'labels') -> CascadeResult:
    """Segment one working-grid volume (see the module docstring).

    ``prior``: ``(L, X, Y, Z)`` uint8 probabilities of the protocol's ``labels`` (or None);
    the models are ``(model, meta)`` pairs from :func:`load_models`. ``members``: also return
    each lobule network's own labels (same hemisphere mask), for comparisons. ``role``: what
    the lobule networks decide (:data:`ROLES`; ``outline`` needs the prior).
    """
    if role not in ROLES:
        raise ValueError(f'unknown role of the lobule networks {role!r}; one of {ROLES}')
    if role == 'outline' and prior is None:
        raise ValueError('the outline role takes the lobules from the prior: pass the prior')
    shape = t1.shape
    n = len(labels)
    if prior is not None:
        region = bounding_box(prior[0] < 128, int(round(roi_margin_mm / GRID_SPACING)), even=True)
    else:
        region = bounding_box(np.ones(shape, bool), 0, even=True)
    sub = Volumes('subject', t1, x_mm, t2, prior).crop(region)
    rshape = sub.t1.shape
    hprobs = _stage_probs(hemisphere_models, sub, 'hemisphere', labels, rshape, device, roi, bf16)
    hmean, _ = ensemble(hprobs)
    hemi = hmean.argmax(0).numpy().astype(np.uint8)
    del hprobs, hmean
    margin = int(round(mask_margin_mm / GRID_SPACING))
    mask = ndimage.binary_dilation(hemi > 0, ndimage.generate_binary_structure(3, 1),
                                   iterations=margin) if margin else hemi > 0
    box = bounding_box(hemi > 0, margin)
    crop = sub.crop(box)
    lprobs = _stage_probs(lobule_models, crop, 'lobules', labels, crop.t1.shape, device, roi,
                          bf16)
    inside = torch.as_tensor(mask[box])
    full = tuple(slice(r.start + b.start, r.start + b.stop) for r, b in zip(region, box))
    member_classes = None
    if members:
        member_classes = []
        for p in lprobs:
            member = np.zeros(shape, np.uint8)
            member[full] = np.where(mask[box], p.argmax(0).numpy(), 0)
            member_classes.append(member)
    lmean, dis = ensemble(lprobs)
    del lprobs
    if role == 'outline':
        outline_role(lmean, crop.prior)
    lmean[:, ~inside] = 0
    lmean[0, ~inside] = 1
    dis[~inside] = 0
    classes = np.zeros(shape, np.uint8)
    classes[full] = lmean.argmax(0).numpy()
    probseg = np.zeros(shape + (n,), np.uint8)
    probseg[..., 0] = 255
    probseg[full] = lmean.mul_(255).round_().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    disagreement = np.zeros(shape, np.float32)
    disagreement[full] = dis.numpy()
    hemisphere = np.zeros(shape, np.uint8)
    hemisphere[region] = hemi
    return CascadeResult(classes, probseg, disagreement, hemisphere, labels, member_classes)
