"""2D brainstem networks: the N-DecoNet paper's Table 1 at this machine's scale (issue 10, item 8).

Oh et al. (ISBI 2024), Table 1, compares decoders on one ResNet-34 encoder and losses (DiceCE
with alpha = 0.1 ... 0.9 on the Dice side) by the macro mIoU of held-out axial slices of T1w in
MNI space at 1 mm, cropped around the brainstem and resized to 224 x 224. Here the same grid
runs on the participant runs of cerebseg work folders (the T1w on the 1 mm brainstem box and
cerebseg's atlas labels of the run, 17 classes: :mod:`cerebseg.training.brainstem2d`),
at a small input size, for few steps, with repeats:

* one split by participant (``--seed``, ``--val-fraction``) shared by every entry: nothing of
  the held-out participants is seen in training, and the held-out score is taken once, after
  the last step (no model selection on it);
* every (decoder, loss[, alpha]) entry is trained ``--repeats`` times (seeds ``seed + r``:
  initialisation, sampling, augmentation);
* scores: macro mIoU in box space of the held-out participants' labelled slices, over all
  classes (background included, the paper's), the nuclei and grey/white matter, with the 95 %
  Student-t interval over repeats; parameters counted on the network as run (classes and
  channels of this label set) beside the paper's, read from the module docstring of
  :mod:`cerebseg.models.nets2d`.

The reference labels are the atlas method's, so the scores say how well a network reproduces
cerebseg's registration of the label set, not the paper's manual labels; with few steps they
rank how fast each entry learns, not where it converges.

Usage::

    python benchmarks/brainstem_models.py --work-dir WORK --evaluate CHECKPOINT \\
        --participant-label 03 08 ...      # one checkpoint on its held-out test participants
    python benchmarks/brainstem_models.py --work-dir WORK [WORK ...] --assets-dir ASSETS \\
        [--decoders ndeconet unet ...] [--losses dice dicece ...] [--alphas 0.1 0.3 ...] \\
        [--size 64] [--steps 100] [--repeats 3] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cerebseg.models import checkpoint as ckpt
from cerebseg.models import nets2d as bs
from cerebseg.models.inference import Slicing
from cerebseg.training.augment import Augment
from cerebseg.training import brainstem2d as bt
from cerebseg.models.losses import ALL_LOSSES
from cerebseg.models.metrics import t_confidence_interval
from cerebseg.utils.labels import read_lut

LOGGER = logging.getLogger('cerebseg.benchmarks.brainstem_models')
#: macro mIoU quoted in issue 10 from the paper's Table 1 (ResNet-34, 224 x 224, 34 classes)
PAPER_MIOU = {'ndeconet': 0.753, 'deeplabv3': 0.789}
#: the losses of Table 1 (``deepceres`` is the 3D cerebellum loss)
TABLE_LOSSES = ('dice', 'jaccard', 'focal', 'softce', 'dicefocal', 'dicece')
ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def paper_parameters() -> dict[str, str]:
    """``{decoder: '21.5M'}``: the paper's column of the table in the module docstring of
    :mod:`cerebseg.models.nets2d`."""
    rows = re.findall(r'^(\w+)\s+[\d,]+\s+(\d+\.\dM|--)', bs.__doc__, re.MULTILINE)
    return {name: value for name, value in rows if name in bs.DECODERS}


def entries(decoders, losses, alphas) -> list[tuple[str, str, float | None]]:
    """(decoder, loss, alpha) of the grid: DiceCE once per alpha, other losses once."""
    out = []
    for decoder in decoders:
        for loss in losses:
            for alpha in (alphas if loss == 'dicece' else (None,)):
                out.append((decoder, loss, alpha))
    return out


def run_entry(decoder, loss, alpha, train, held_out, labels, opts, repeat: int) -> dict:
    seed = opts.seed + repeat
    torch.manual_seed(seed)
    model = bs.build_model(decoder, opts.encoder, in_channels=len(train.slicing.channels),
                           n_classes=len(labels), encoder_width=opts.encoder_width)
    tic = time.perf_counter()
    result = bt.train_brainstem(model, train, held_out, labels=labels, loss=loss, alpha=alpha,
                                steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
                                seed=seed, device=opts.device, val_every=opts.steps,
                                patience=0, augment=None if opts.no_augment else Augment.slices())
    final = result.history[-1]
    return {'decoder': decoder, 'loss': loss, 'alpha': alpha, 'repeat': repeat, 'seed': seed,
            'parameters': bs.count_parameters(model), 'steps': result.steps,
            'final_loss': final['loss'], 'train_seconds': final['seconds'],
            'eval_seconds': final.get('eval_seconds'),
            'seconds': round(time.perf_counter() - tic, 1),
            **{k: final.get(f'miou_{k}') for k in bt.SCORES}}


def _ci(values) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return 'n/a'
    if len(values) < 2:
        return f'{values[0]:.3f}'
    mean, low, high = t_confidence_interval(values)
    return f'{mean:.3f} [{max(low, 0):.3f}, {min(high, 1):.3f}]'


def table(results: list[dict], opts) -> str:
    paper = paper_parameters()
    head = ('| decoder | loss | parameters (run) | paper parameters | mIoU all (95 % CI) | '
            'mIoU nuclei | mIoU GM/WM | paper mIoU | s / step | s / evaluation |')
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    for decoder, loss, alpha in entries(opts.decoders, opts.losses, opts.alphas):
        rows = [r for r in results if (r['decoder'], r['loss'], r['alpha'])
                == (decoder, loss, alpha)]
        if not rows:
            continue
        name = loss if alpha is None else f'{loss} alpha={alpha:g}'
        per_step = np.mean([r['train_seconds'] / max(r['steps'], 1) for r in rows])
        lines.append(f'| {decoder} | {name} | {rows[0]["parameters"] / 1e6:.2f}M | '
                     f'{paper.get(decoder, "--")} | {_ci([r["all"] for r in rows])} | '
                     f'{_ci([r["nuclei"] for r in rows])} | {_ci([r["gmwm"] for r in rows])} | '
                     f'{PAPER_MIOU.get(decoder, "--")} | {per_step:.2f} | '
                     f'{np.mean([r["eval_seconds"] or 0 for r in rows]):.1f} |')
    return '\n'.join(lines)


def evaluate(opts, found, labels) -> int:
    """Held-out macro mIoU of one checkpoint: pooled over the test participants (as in
    training), and per participant with the 95 % t interval over participants."""
    model, meta = ckpt.load_brainstem_net(opts.evaluate, device=opts.device)
    slicing = Slicing(**meta['meta']['slicing'])
    trained_on = set(sum((meta['meta'].get('split') or {}).values(), []))
    chosen = [f for f in found if not opts.participant_label or f[1] in opts.participant_label]
    seen = sorted({f[1] for f in chosen} & trained_on)
    if seen:
        raise SystemExit(f'{opts.evaluate} was trained or validated on {seen}: not held out')
    if not chosen:
        raise SystemExit('no participant run matches --participant-label')
    cases = [bt.load_case(*f, labels) for f in chosen]
    names = [n for _, n in labels]
    groups = bt.label_groups(names)
    tic = time.perf_counter()
    pooled = bt.score_cases(model, cases, slicing, groups, device=opts.device)
    each = [bt.score_cases(model, [c], slicing, groups, device=opts.device) for c in cases]
    seconds = (time.perf_counter() - tic) / (len(cases) + 1)
    n_params = bs.count_parameters(model)
    print(f'Held-out test participants ({", ".join(c.participant for c in cases)}), '
          f'{opts.evaluate.name}: {meta["config"]["decoder"]}/{meta["config"]["encoder"]} '
          f'width {meta["config"].get("encoder_width", 64)}, {n_params / 1e6:.2f}M parameters, '
          f'slicing {meta["meta"]["slicing"]}; reference: the atlas method\'s labels of these '
          'participants; paper: 0.753 (N-DecoNet, its data and labels).\n')
    print('| score | pooled over participants | mean over participants (95 % CI) |')
    print('|---|---|---|')
    for key in bt.SCORES:
        print(f'| mIoU {key} | {pooled[key]:.3f} | {_ci([e[key] for e in each])} |')
    print(f'\nInference (2 cores, {torch.get_num_threads()} torch thread(s)): '
          f'{seconds:.1f} s per participant (labelled slices only)')
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work-dir', type=Path, nargs='+', required=True,
                        help='cerebseg work folders of participant runs with the brainstem')
    parser.add_argument('--assets-dir', type=Path, default=None,
                        help='assets with the brainstem label set (its lookup table)')
    parser.add_argument('--lut', type=Path, default=None, help='lookup table (overrides)')
    parser.add_argument('--decoders', nargs='+', choices=sorted(bs.DECODERS),
                        default=[d for d in bs.DECODERS if d != 'udeconet'])
    parser.add_argument('--losses', nargs='+', choices=sorted(ALL_LOSSES),
                        default=list(TABLE_LOSSES))
    parser.add_argument('--alphas', nargs='+', type=float, default=list(ALPHAS),
                        help='Dice weights of the DiceCE entries')
    parser.add_argument('--encoder', choices=sorted(bs.ENCODERS), default='resnet34')
    parser.add_argument('--encoder-width', type=int, default=64,
                        help='first-stage width of the encoder (64: the paper\'s ResNet)')
    parser.add_argument('--evaluate', type=Path, default=None, metavar='CHECKPOINT',
                        help='instead of the grid: score this checkpoint on the participants '
                             'of --participant-label (its held-out test set)')
    parser.add_argument('--participant-label', nargs='+', default=None,
                        help='with --evaluate: the participants to score')
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--crop', type=int, default=64)
    parser.add_argument('--context', type=int, default=0)
    parser.add_argument('--steps', type=int, default=100)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--val-fraction', type=float, default=0.2)
    parser.add_argument('--no-augment', action='store_true')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--nthreads', type=int, default=1,
                        help='torch threads (default 1: on a busy 2-core host 2 threads ran '
                             '6-15x slower; raise it on a free machine)')
    parser.add_argument('--json', type=Path, default=None,
                        help='write every run\'s scores here')
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='%(asctime)s %(name)s %(levelname)s: %(message)s')
    torch.set_num_threads(opts.nthreads)
    from cerebseg.models.inference import resolve_device

    opts.device = resolve_device(opts.device)
    lut = opts.lut
    if lut is None:
        from cerebseg.assets.locate import load_assets

        assets = load_assets(opts.assets_dir, verify=False)
        lut = assets.path(assets.brainstem()['lut'])
    labels = read_lut(lut)
    found = bt.find_cases(opts.work_dir)
    if opts.evaluate:
        return evaluate(opts, found, labels)
    train_people, held_people = bt.split_participants([f[1] for f in found],
                                                      opts.val_fraction, opts.seed)
    cases = [bt.load_case(*f, labels) for f in found]
    slicing = Slicing(size=opts.size, context=opts.context, crop=opts.crop)
    train = bt.SliceDataset([c for c in cases if c.participant in train_people], slicing)
    held_out = [c for c in cases if c.participant in held_people]
    grid = entries(opts.decoders, opts.losses, opts.alphas)
    LOGGER.info('%d entries x %d repeats, %d steps each; training %s (%d slices), held out %s',
                len(grid), opts.repeats, opts.steps, train_people, len(train), held_people)
    results = []
    for decoder, loss, alpha in grid:
        for repeat in range(opts.repeats):
            results.append(run_entry(decoder, loss, alpha, train, held_out, labels, opts,
                                     repeat))
            LOGGER.info('%s', results[-1])
            if opts.json:
                opts.json.write_text(json.dumps(results, indent=1))
    print(f'Held-out macro mIoU ({", ".join(held_people)}; trained on {len(train_people)} '
          f'participants, {len(train)} slices), {opts.encoder}, {opts.size}x{opts.size} from a '
          f'{opts.crop}-voxel crop, context {opts.context}, {opts.steps} steps of '
          f'{opts.batch_size}, {opts.repeats} repeats (95 % t interval, clipped to [0, 1]); '
          'paper: ResNet-34, 224x224, 34 classes, its Table 1 as quoted in issue 10.\n')
    print(table(results, opts))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
