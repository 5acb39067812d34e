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
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from cerebseg.models.segmentation import SLAB, CheckpointError, load_checkpoint
from cerebseg.models.training import Subject, bounding_box, predict, stage_arrays

LOGGER = logging.getLogger(__name__)
GRID_SPACING = 0.5


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


def load_models(paths, *, inputs, stage: str, protocol: str, device='cpu') -> list:
    """``[(model, meta), ...]`` of the checkpoints of one stage, checked against the run."""
    models = [load_checkpoint(p, inputs=inputs, stage=stage, protocol=protocol, device=device)
              for p in paths]
    labels = [m[1]['labels'] for m in models]
    if any(lb != labels[0] for lb in labels):
        raise ValueError(f'the {stage} checkpoints {list(map(str, paths))} do not share one '
                         'label table')
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


def label_uncertainty(classes: np.ndarray, disagreement: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount(classes.ravel(), minlength=n)[:n].astype(np.float64)
    sums = np.bincount(classes.ravel(), weights=disagreement.ravel(), minlength=n)[:n]
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _stage_probs(models, subject: Subject, stage: str, labels: list, out_shape, device,
                 roi: int, bf16: bool) -> list[torch.Tensor]:
    probs = []
    for model, meta in models:
        factor = int(round(meta['spacing'] / GRID_SPACING))
        image, _, _ = stage_arrays(subject, stage, meta['inputs'], labels, factor)
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
                bf16: bool = False, members: bool = False) -> CascadeResult:
    """Segment one working-grid volume (see the module docstring).

    ``prior``: ``(L, X, Y, Z)`` uint8 probabilities of the protocol's ``labels`` (or None);
    the models are ``(model, meta)`` pairs from :func:`load_models`. ``members``: also return
    each lobule network's own labels (same hemisphere mask), for comparisons.
    """
    shape = t1.shape
    n = len(labels)
    if prior is not None:
        region = bounding_box(prior[0] < 128, int(round(roi_margin_mm / GRID_SPACING)), even=True)
    else:
        region = bounding_box(np.ones(shape, bool), 0, even=True)
    sub = Subject('subject', t1, np.zeros(shape, np.uint8), x_mm, t2, prior).crop(region)
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


#: the weights that ship with cerebseg (see the model card next to it)
DEFAULT_MANIFEST = Path(__file__).resolve().parents[1] / 'data' / 'weights' / 'deepceres.json'
MODEL_CHOICES = ('ensemble', 'unet', 'dpn')


def select_weights(manifest=None, *, t2w: bool, prior: bool, models: str = 'ensemble',
                   protocol: str = 'suit') -> dict:
    """The checkpoints a run needs, from a weights manifest (JSON).

    The manifest maps an input set (``T1w+prior``, ``T1w+T2w+prior``, ...) to its
    ``hemisphere`` and ``lobules`` checkpoints (``file`` relative to the manifest,
    ``architecture``, ``inputs``). ``models`` keeps the lobule networks of one architecture or
    all of them (the ensemble). Raises :class:`CheckpointError` (exit 126) with the fix when
    something is missing.
    """
    manifest = Path(manifest) if manifest else DEFAULT_MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f'segmentation weights manifest not found: {manifest}. Reinstall '
                              'cerebseg, or pass --cnn-weights with a manifest of weights '
                              'trained by `cerebseg-train segmentation`.')
    try:
        spec = json.loads(manifest.read_text())
    except ValueError as err:
        raise CheckpointError(f'{manifest} is not valid JSON ({err})') from err
    if spec.get('protocol') != protocol:
        raise CheckpointError(f'the weights of {manifest} segment the {spec.get("protocol")} '
                              f'protocol, not {protocol}; use --atlas-library '
                              f'{spec.get("protocol")} or weights trained on {protocol} labels')
    variant = '+'.join(['T1w'] + (['T2w'] if t2w else []) + (['prior'] if prior else []))
    variants = spec.get('variants', {})
    if variant not in variants:
        hint = ' (--t1-only ignores the T2w)' if t2w else ''
        hint += '' if prior else ' (without --no-atlas-prior the prior is used)'
        raise CheckpointError(
            f'{manifest} has no weights for the inputs {variant}; it has '
            f'{sorted(variants) or "none"}. Choose a run with those inputs{hint}, or train '
            f'weights for {variant} with `cerebseg-train segmentation --inputs '
            f'{" ".join(variant.split("+"))}` and pass their manifest with --cnn-weights.')
    out = {'variant': variant, 'manifest': str(manifest)}
    for stage in ('hemisphere', 'lobules'):
        entries = variants[variant].get(stage, [])
        if stage == 'lobules' and models != 'ensemble':
            entries = [e for e in entries if e['architecture'] == models]
        if not entries:
            raise CheckpointError(f'{manifest} has no {stage} network for {variant}'
                                  + (f' with the {models} architecture' if stage == 'lobules'
                                     else '') + '; use --models ensemble or other weights.')
        inputs = {tuple(e['inputs']) for e in entries}
        if len(inputs) > 1:
            raise CheckpointError(f'{manifest}: the {stage} networks of {variant} differ in '
                                  'their inputs')
        files = [manifest.parent / e['file'] for e in entries]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f'segmentation weights not found: {f} (listed in '
                                      f'{manifest}); reinstall cerebseg or fix the manifest.')
        out[stage] = {'files': [str(f) for f in files], 'inputs': list(inputs.pop()),
                      'architectures': [e['architecture'] for e in entries]}
    return out
