"""Training of the 2D brainstem networks on axial slices of the brainstem box (torch + NumPy).

The data are (T1w, labels) pairs on the 1 mm brainstem box (:data:`cerebseg.utils.grid.
BRAINSTEM_GRID`, x x y x z, RAS, MNI152NLin2009cAsym): ``t1_box`` of the participant run's
``preproc_wf.to_bs_grid`` and ``brainstem_dseg`` of ``brainstem_wf.atlas`` (the label set
carried by cerebseg's diffeomorphic registration), found in work folders by :func:`find_cases`
(where :mod:`cerebseg.workflows.workdir` says a run leaves them).

Slicing (:class:`cerebseg.models.inference.Slicing`), the pipeline's own, the same for training
and inference:

* axial slices ``volume[:, :, z]``, image rows = x (left-right), columns = y; training keeps the
  slices that hold labels plus ``margin`` empty slices at each end of that range, inference
  (:func:`cerebseg.models.inference.predict_volume`) runs every slice;
* 2.5D: ``context`` neighbours on each side become input channels (``2 * context + 1``, ordered
  ``z - context .. z + context``, the edge slice repeated beyond the volume);
* a fixed in-plane square window of ``crop`` voxels centred on ``center`` (default: the middle of
  the plane; no labels needed, so inference crops the same way), zero-padded where it leaves the
  volume; a warning says when labels fall outside it;
* resized to ``size`` x ``size`` (bilinear for images, nearest for labels); inference resizes the
  class probabilities back (bilinear, antialiased when shrinking), puts them in the window
  (background probability 1 outside) and stacks the slices into ``(L, X, Y, Z)``.

Training (:func:`train_brainstem`): the split is by participant (:func:`split_participants`, no
participant on both sides); random batches of slices with light augmentation
(:meth:`cerebseg.training.augment.Augment.slices`: rotation, isotropic zoom and translation in
one resampling, gamma / contrast / offset / noise;
left-right flips only with ``flip > 0``, the left/right classes then swapped with
:func:`cerebseg.utils.labels.swap_classes`); Adam on a loss of :func:`cerebseg.models.losses.
build_loss`; every ``val_every`` steps the held-out participants are segmented through
:func:`predict_volume` and scored in box space by the macro mean IoU over all classes, the nuclei
and grey/white matter (:func:`label_groups`); the best weights by the all-class mIoU are kept
and training stops after ``patience`` evaluations without improvement.
"""
from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cerebseg.models.inference import Slicing, crop_plane, predict_volume, resize, slice_stack
from cerebseg.models.metrics import iou_counts, iou_from_counts
from cerebseg.models.losses import build_loss
from cerebseg.training.augment import Augment, augment_batch
from cerebseg.workflows.workdir import BS_DSEG_BOX, BS_T1_BOX, run_folders, workflow_name

LOGGER = logging.getLogger(__name__)

#: what made the training labels (recorded in checkpoints)
LABEL_SOURCE = ("cerebseg's atlas method: the brainstem label set registered onto the T1w "
                "by cerebseg's diffeomorphic (torch) registration (brainstem_wf.atlas)")
SCORES = ('all', 'nuclei', 'gmwm')


# ------------------------------------------------------------------------------------ data

@dataclass
class Case:
    """One T1w on the brainstem box: ``t1`` float32 and ``classes`` (class indices, uint8),
    both ``(X, Y, Z)``; ``participant`` decides the split."""

    name: str
    participant: str
    t1: np.ndarray
    classes: np.ndarray


def _case_name(folder: str) -> tuple[str, str]:
    """``cerebseg_sub_01_ses_a_wf`` -> (``sub-01_ses-a``, ``01``)."""
    label = folder[len('cerebseg_'):-len('_wf')]
    tokens = label.split('_')
    if len(tokens) % 2 == 0 and tokens[0] == 'sub':
        name = '_'.join(f'{k}-{v}' for k, v in zip(tokens[::2], tokens[1::2]))
        return name, tokens[1]
    return label, label


def find_cases(work_dirs) -> list[tuple[str, str, Path, Path]]:
    """``(name, participant, t1_box, dseg_box)`` of every participant run in cerebseg work
    folders (:func:`cerebseg.workflows.workdir.run_folders` +
    :data:`~cerebseg.workflows.workdir.BS_T1_BOX` and
    :data:`~cerebseg.workflows.workdir.BS_DSEG_BOX`), sorted by name; a run found in two
    folders is used once (the first folder). Raises ``ValueError`` naming a folder with no
    usable run."""
    found = {}
    for work in map(Path, work_dirs):
        if not work.is_dir():
            raise ValueError(f'work folder not found: {work}')
        # WORK/cerebseg_wf/cerebseg_sub_X_wf (one graph for all runs), or older
        # WORK/cerebseg_sub_X_wf
        runs = sorted(p for p in [*run_folders(work), *work.glob(workflow_name('sub-*'))]
                      if p.is_dir())
        usable = 0
        for run in runs:
            t1, dseg = run / BS_T1_BOX, run / BS_DSEG_BOX
            if not t1.is_file() or not dseg.is_file():
                LOGGER.warning('%s has no %s; skipped (run cerebseg with the brainstem, e.g. '
                               '--skip-cerebellum, with -w %s)', run,
                               BS_DSEG_BOX if t1.is_file() else BS_T1_BOX, work)
                continue
            usable += 1
            name, participant = _case_name(run.name)
            if name in found:
                LOGGER.warning('%s is in %s and %s; the first is used', name,
                               found[name][2].parents[2], run)
                continue
            found[name] = (name, participant, t1, dseg)
        if not usable:
            raise ValueError(f'{work} holds no participant run with {BS_T1_BOX} and {BS_DSEG_BOX} '
                             '(cerebseg_sub_<label>_wf folders); pass the -w folder of a '
                             'cerebseg participant run that segmented the brainstem')
    return [found[k] for k in sorted(found)]


def load_case(name: str, participant: str, t1_path, dseg_path, labels: list) -> Case:
    """Read one pair; the labels' values must be those of ``labels`` (``[[index, name], ..]``)
    and both images must share their grid (``ValueError`` names the files otherwise)."""
    import nibabel as nib

    from cerebseg.utils.labels import class_index

    t1_img, dseg_img = nib.load(str(t1_path)), nib.load(str(dseg_path))
    if t1_img.shape != dseg_img.shape or not np.allclose(t1_img.affine, dseg_img.affine,
                                                         atol=1e-3):
        raise ValueError(f'{t1_path} {t1_img.shape} and {dseg_path} {dseg_img.shape} are not on '
                         'one grid; re-run the participant so that both come from one run')
    if len(t1_img.shape) != 3:
        raise ValueError(f'{t1_path} must be a 3D volume, not {t1_img.shape}')
    t1 = np.asarray(t1_img.dataobj, np.float32)
    dseg = np.rint(np.asarray(dseg_img.dataobj)).astype(np.int64)
    try:
        classes = class_index(dseg, labels)
    except ValueError as err:
        raise ValueError(f'{dseg_path}: {err}; use the lookup table of the assets that made '
                         'it') from err
    if not np.isfinite(t1).all():
        raise ValueError(f'{t1_path} holds NaN or infinite values')
    return Case(name, participant, t1, classes)


def split_participants(participants, val_fraction: float, seed: int = 0):
    """``(train, validation)``: sorted participant lists, ``round(val_fraction * n)`` of them
    (at least 1 and at most ``n - 1`` when ``val_fraction > 0``) drawn for validation."""
    people = sorted(set(participants))
    if not 0 <= val_fraction < 1:
        raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')
    if val_fraction == 0:
        return people, []
    if len(people) < 2:
        raise ValueError(f'a validation split needs at least 2 participants, got {people}; '
                         'add work folders or set the validation fraction to 0')
    n_val = min(max(round(val_fraction * len(people)), 1), len(people) - 1)
    order = np.random.default_rng(seed).permutation(len(people))
    val = sorted(people[i] for i in order[:n_val])
    return [p for p in people if p not in val], val


def label_groups(names) -> dict[str, list[int] | None]:
    """Class indices of each score: ``all`` (None: every class, background included, the
    paper's macro mIoU), ``nuclei`` (foreground classes not named ``*_GM`` / ``*_WM``) and
    ``gmwm`` (grey and white matter of midbrain, pons, medulla)."""
    names = list(names)
    tissue = [i for i, n in enumerate(names) if i and re.search(r'_(GM|WM)$', n)]
    nuclei = [i for i in range(1, len(names)) if i not in tissue]
    return {'all': None, 'nuclei': nuclei, 'gmwm': tissue}


def labelled_slices(classes: np.ndarray, margin: int) -> np.ndarray:
    """z indices of the slices holding labels, plus ``margin`` slices beyond each end."""
    z = np.flatnonzero((classes > 0).any((0, 1)))
    if not z.size:
        return z
    return np.arange(max(z[0] - margin, 0), min(z[-1] + margin + 1, classes.shape[2]))


class SliceDataset:
    """The axial slices of ``cases`` under ``slicing``, kept at the crop's resolution:
    ``images (N, C, crop, crop)`` float32, ``labels (N, crop, crop)`` uint8, ``index`` the
    (case name, z) of each; :meth:`batch` resizes (and augments) on the fly."""

    def __init__(self, cases, slicing: Slicing, margin: int = 2):
        self.slicing, self.margin = slicing, margin
        images, labels, self.index = [], [], []
        for case in cases:
            z = labelled_slices(case.classes, margin)
            if not z.size:
                LOGGER.warning('%s has no labelled voxel; left out', case.name)
                continue
            planes = np.moveaxis(case.classes, 2, 0)  # (Z, X, Y)
            outside = int((planes > 0).sum() - (crop_plane(planes, slicing) > 0).sum())
            if outside:
                LOGGER.warning('%s: %d labelled voxels lie outside the %d-voxel crop window; '
                               'enlarge the crop or move its centre', case.name, outside,
                               slicing.crop)
            images.append(crop_plane(slice_stack(case.t1, z, slicing.context), slicing))
            labels.append(crop_plane(planes[z], slicing))
            self.index += [(case.name, int(k)) for k in z]
        if not images:
            raise ValueError('no labelled slices in the cases given')
        self.images = np.concatenate(images).astype(np.float32)
        self.labels = np.concatenate(labels).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, idx, rng: np.random.Generator | None = None, augment: Augment | None = None,
              perm: np.ndarray | None = None):
        """``(x (B, C, size, size) float32, y (B, size, size) int64)`` tensors of slices
        ``idx``, augmented when ``augment`` and ``rng`` are given (``perm``: the left/right
        class swap, needed when ``augment.flip > 0``)."""
        x = torch.from_numpy(self.images[idx])
        y = torch.from_numpy(self.labels[idx].astype(np.int64))
        if augment is None or rng is None:
            size = self.slicing.size
            return resize(x, size), resize(y[:, None].float(), size, 'nearest')[:, 0].long()
        return augment_batch(x, y, self.slicing.size, rng, augment, perm)


def score_cases(model, cases, slicing: Slicing, groups: dict, *, margin: int = 2,
                batch_size: int = 32, device=None, bf16: bool = False) -> dict[str, float]:
    """Macro mIoU of each of ``groups`` (:func:`label_groups`) over ``cases``, in box space on
    their labelled slices (+ ``margin``), the voxels of all cases pooled per class."""
    inter = union = 0
    for case in cases:
        z = labelled_slices(case.classes, margin)
        probs = predict_volume(model, case.t1, **slicing.to_dict(), batch_size=batch_size,
                               device=device, slices=z, bf16=bf16)
        n = probs.shape[0]
        i, u = iou_counts(probs[:, :, :, z].argmax(0), case.classes[:, :, z], n)
        inter, union = inter + i, union + u
    return {k: iou_from_counts(inter, union, v) for k, v in groups.items()}


# -------------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    """What :func:`train_brainstem` returns: the best weights (CPU), their scores and step, the
    history of evaluations (``seconds``: since the start, when the evaluation began;
    ``eval_seconds``: its duration), the steps run and whether early stopping ended the run."""

    state_dict: dict
    scores: dict
    best_step: int
    steps: int
    history: list = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


def epoch_steps(n_slices: int, batch_size: int) -> int:
    """Optimisation steps of one pass over ``n_slices``."""
    return max(1, math.ceil(n_slices / batch_size))


def train_brainstem(model, train: SliceDataset, validation=(), *, labels, loss: str = 'dicece',
                    alpha: float | None = 0.1, steps: int = 1000, batch_size: int = 16,
                    lr: float = 1e-3, seed: int = 0, device='cpu',
                    augment: Augment | None = Augment.slices(), val_every: int | None = None,
                    patience: int = 10, bf16: bool = False, on_evaluate=None,
                    lr_schedule: str = 'constant') -> TrainResult:
    """Train ``model`` on ``train`` slices; score ``validation`` cases (:func:`score_cases`).

    ``labels``: class names, background first. ``loss`` and ``alpha`` go to
    :func:`build_loss` (``alpha`` only for ``dicece``). ``val_every``: steps between
    evaluations (default one pass over the slices, and always at the end); ``patience``:
    evaluations without a better all-class mIoU before stopping (0: never stop early).
    Without validation cases the last weights are returned. ``on_evaluate(model, entry,
    improved)`` is called after each evaluation. ``lr_schedule``: ``'constant'`` or
    ``'cosine'`` (from ``lr`` down to ``lr / 100`` at ``steps``; the shipped weights: with a
    constant rate the validation mIoU of ds002748 swung by 0.05 between epochs).
    """
    if lr_schedule not in ('constant', 'cosine'):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {lr_schedule!r}")
    from cerebseg.utils.labels import swap_classes

    device = torch.device(device)
    names = [n for _, n in labels] if labels and not isinstance(labels[0], str) else list(labels)
    groups = label_groups(names)
    perm = swap_classes([[i, n] for i, n in enumerate(names)]) if augment and augment.flip \
        else None
    criterion = build_loss(loss, **({'alpha': alpha} if loss == 'dicece' else {}))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = None
    if lr_schedule == 'cosine':
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1),
                                                           eta_min=lr / 100)
    val_every = val_every or epoch_steps(len(train), batch_size)
    use_bf16 = bf16 or device.type == 'cuda'
    t0 = time.perf_counter()
    history, losses, order = [], [], np.zeros(0, int)
    best, best_step, best_state, stale, stopped = -1.0, 0, None, 0, False
    step = 0
    while step < steps:
        if order.size < batch_size:
            order = np.concatenate([order, rng.permutation(len(train))])
        idx, order = order[:batch_size], order[batch_size:]
        x, y = train.batch(idx, rng, augment, perm)
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x.to(device))
        value = criterion(logits.float(), y.to(device))
        if not torch.isfinite(value):
            raise RuntimeError(f'the {loss} loss is {float(value)} at step {step + 1}; lower the '
                               'learning rate or check the input intensities')
        value.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(value.detach()))
        step += 1
        if step % val_every and step < steps:
            continue
        entry = {'step': step, 'loss': float(np.mean(losses)),
                 'seconds': round(time.perf_counter() - t0, 1)}
        losses = []
        if validation:
            tic = time.perf_counter()
            entry.update({f'miou_{k}': v for k, v in score_cases(
                model, validation, train.slicing, groups, margin=train.margin,
                batch_size=max(batch_size, 16), device=device, bf16=bf16).items()})
            entry['eval_seconds'] = round(time.perf_counter() - tic, 1)
        history.append(entry)
        score = entry.get('miou_all', float('nan'))
        improved = not validation or (np.isfinite(score) and score > best)
        if improved:
            best, best_step, stale = score, step, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        LOGGER.info('step %d/%d: loss %.4f%s, %.0f s', step, steps, entry['loss'],
                    ''.join(f', mIoU {k} {entry[f"miou_{k}"]:.4f}' for k in SCORES
                            if f'miou_{k}' in entry), entry['seconds'])
        if on_evaluate:
            on_evaluate(model, entry, improved)
        if validation and patience and stale >= patience:
            LOGGER.info('no better validation mIoU for %d evaluations: stopped at step %d '
                        '(best: step %d, %.4f)', patience, step, best_step, best)
            stopped = True
            break
    if best_state is None:  # no finite validation score at all: the last weights
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        best_step = step
    best_entry = next((h for h in history if h['step'] == best_step), {})
    scores = {k: best_entry[f'miou_{k}'] for k in SCORES if f'miou_{k}' in best_entry}
    return TrainResult(state_dict=best_state, scores=scores, best_step=best_step, steps=step,
                       history=history, stopped_early=stopped,
                       seconds=round(time.perf_counter() - t0, 1))


def checkpoint_meta(*, labels, slicing: Slicing, split: dict, result: TrainResult,
                    settings: dict) -> dict:
    """The ``meta`` of :func:`cerebseg.models.checkpoint.save_brainstem_net` for a trained network:
    channel and label names, slicing, participant split, steps, scores, history, settings."""
    names = [n for _, n in labels] if labels and not isinstance(labels[0], str) else list(labels)
    return {'channels': slicing.channels, 'labels': names, 'slicing': slicing.to_dict(),
            'split': {k: sorted(v) for k, v in split.items()}, 'steps': result.steps,
            'best_step': result.best_step, 'scores': result.scores,
            'stopped_early': result.stopped_early, 'history': result.history,
            'label_source': LABEL_SOURCE, 'training': copy.deepcopy(settings),
            'seconds': result.seconds}
