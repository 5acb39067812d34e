"""DeepCeres benchmark: accuracy (Table-1 style) and CPU inference cost of the networks.

Accuracy, on the 0.5 mm working grid, per case:

* **held-out subjects** (``--test``): participants of ``--bids`` whose reference labels are in
  ``--labels`` (the silver-standard labels of the model card) and who were not trained on.
  Their working-grid images and multi-atlas prior come from the training-data cache of
  ``cerebseg-train segmentation`` (``--work-dir``; prepared on demand).
* **known deformations** (``--known``): each library entry (template T1w, its T2w where it has
  one, and its atlas labels) deformed by a seeded random diffeomorphism (largest component
  ``--max-mm``) with altered intensities (bias field, gamma, noise), as in
  ``benchmarks/registration.py``. The truth is exact: the entry's labels under the same
  deformation. The prior is cerebseg's: the *other* entries registered (torch) and fused.

Methods: ``prior`` (the multi-atlas labels alone) and, for each weights manifest given
(``--weights NAME=MANIFEST``, repeatable), the cascade with the U-Net, the DPN and their ensemble
(one run per case: the members of the ensemble give the single-network rows).
For each: mean over labels of the Dice (mean (sd) over cases), whole-cerebellum Dice, and the
two-sided Wilcoxon signed-rank p-value of the per-case mean Dice against ``prior``.
``--per-label METHOD`` also prints the per-label table (paper's Table 1 layout) against the prior.

Cost (``--timing``): wall time and peak resident memory of each stage network (on the whole
cropped working grid of one held-out subject), of the paper-width U-Net and DPN (untrained
weights: the cost does not depend on them) and of the whole cascade, each in a fresh process,
on ``--threads`` CPU threads.

Usage::

    python benchmarks/segmentation.py --assets-dir .assets --work-dir WORK --labels SILVER \\
        --test 01 02 60 61 62 --weights default=cerebseg/data/weights/deepceres.json --timing
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

os.environ.setdefault('NIPYPE_NO_ET', '1')
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cerebseg.models import cascade  # noqa: E402
from cerebseg.models import checkpoint as ckpt  # noqa: E402
from cerebseg.utils.evaluation import (dice_per_label, format_table, scores_table,  # noqa: E402
                                       whole_dice, wilcoxon_p)
from cerebseg.utils.labels import read_lut  # noqa: E402
from registration import alter_intensities  # noqa: E402  (benchmarks/registration.py)

SPACING = 0.5
ROOT = Path(__file__).resolve().parents[1]


def held_out_cases(args, assets, library):
    from cerebseg.bids_app.bids import collect_inputs
    from cerebseg.training.data import find_label_file, prepare_subject

    runs = collect_inputs(args.bids, args.test, t1_only=False, validate=False)
    cases = []
    for run in runs:
        subject = prepare_subject(run, find_label_file(args.labels, run), assets, library,
                                  args.work_dir, omp_nthreads=args.threads)
        cases.append((f'{run.label}', subject))
    return cases


def known_cases(args, assets, library):
    """Library entries under known random deformations; prior from the other entries."""
    import nibabel as nib

    from cerebseg.kernels.wmv import weighted_majority_vote
    from cerebseg.models import registration as reg
    from cerebseg.training import augment as aug
    from cerebseg.training.cascade import Subject, crop_subject
    from cerebseg.utils.grid import BoxGrid

    lib = assets.library(args.library)
    grid = BoxGrid.from_dict(assets.manifest['grid'])
    x_mm = grid.affine[0, 3] + grid.spacing * np.arange(grid.shape[0])
    load = lambda p, t: np.asarray(nib.load(assets.path(p)).dataobj, t)  # noqa: E731
    t1 = np.stack([load(e['files']['t1w'], np.float32) for e in lib['entries']])
    lab = np.stack([load(e['files']['dseg'], np.int16) for e in lib['entries']])
    t2 = [load(e['files']['t2w'], np.float32) if 't2w' in e['files'] else None
          for e in lib['entries']]
    rng = np.random.default_rng(args.seed)
    cases = []
    for j, entry in enumerate(lib['entries'][:args.known]):
        v = aug.random_velocity(t1.shape[1:], SPACING, seed=args.seed + j, max_mm=args.max_mm)
        fixed = alter_intensities(aug.random_deformation(t1[j:j + 1], v, SPACING)[0], rng)
        fixed_t2 = None
        if t2[j] is not None:
            fixed_t2 = alter_intensities(aug.random_deformation(t2[j][None], v, SPACING)[0], rng)
        truth = aug.random_deformation(lab[j:j + 1], v, SPACING, order=0)[0]
        others = [k for k in range(len(t1)) if k != j]
        result = reg.register_svf(fixed, t1[others], spacing=SPACING, seed=args.seed)
        warped_t1, warped_lab = reg.apply_svf_many(
            result, [(list(t1[others]), 1), (list(lab[others]), 0)])
        fusion = weighted_majority_vote(np.stack(warped_lab), np.stack(warped_t1)[:, None],
                                        fixed[None], int(lib['n_labels']),
                                        num_threads=args.threads)
        prior = np.moveaxis(fusion.probseg_uint8(), -1, 0)
        subject = Subject(f'known {entry["name"]}', fixed, x_mm, fixed_t2, prior,
                          classes=truth.astype(np.uint8))
        cases.append((subject.name, crop_subject(subject, 24)))
    return cases


def predictions(subject, labels, manifests, args):
    """``{method: label array}`` for one case: the prior, and per weights manifest one
    ensemble cascade whose members give the U-Net and DPN rows (same hemisphere mask)."""
    out = {'prior': subject.prior.argmax(0).astype(np.uint8)}
    for name, manifest in manifests.items():
        t2w = name.endswith('t2w')
        if t2w and subject.t2 is None:
            continue
        try:
            w = ckpt.select_weights(manifest, t2w=t2w, prior=not name.endswith('noprior'),
                                       protocol=args.library)
        except ckpt.CheckpointError as err:
            print(f'# {name}: {err}')
            continue
        hemi = cascade.load_models(w['hemisphere']['files'], inputs=w['hemisphere']['inputs'],
                                   stage='hemisphere', protocol=args.library)
        lob = cascade.load_models(w['lobules']['files'], inputs=w['lobules']['inputs'],
                                  stage='lobules', protocol=args.library)
        res = cascade.run_cascade(subject.t1, labels=labels, x_mm=subject.x_mm,
                                  hemisphere_models=hemi, lobule_models=lob, t2=subject.t2,
                                  prior=subject.prior, members=True)
        for arch, member in zip(w['lobules']['architectures'], res.members):
            out[f'{name} {arch}'] = member
        if len(res.members) > 1:
            out[f'{name} ensemble'] = res.classes
    return out


def _rss_gb(field: str) -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024 ** 2
    return float('nan')


def timing_child(queue, args, what):
    torch.set_num_threads(args.threads)
    from cerebseg.assets.locate import load_assets

    assets = load_assets(args.assets_dir)
    library = assets.library_paths(args.library)
    labels = read_lut(library['lut'])
    args.test = args.test[:1]
    _, subject = held_out_cases(args, assets, library)[0]
    w = ckpt.select_weights(args.timing_manifest, t2w=False, prior=True,
                               models='ensemble', protocol=args.library)
    hemi = cascade.load_models(w['hemisphere']['files'], inputs=w['hemisphere']['inputs'],
                               stage='hemisphere', protocol=args.library)
    lob = cascade.load_models(w['lobules']['files'], inputs=w['lobules']['inputs'],
                              stage='lobules', protocol=args.library)
    def reset_peak():  # Linux: the peak resident size restarts from the current one
        Path('/proc/self/clear_refs').write_text('5')
        return _rss_gb('VmRSS')

    before = reset_peak()
    tic = time.perf_counter()
    if what == 'cascade':
        cascade.run_cascade(subject.t1, labels=labels, x_mm=subject.x_mm, hemisphere_models=hemi,
                            lobule_models=lob, prior=subject.prior)
    else:
        from cerebseg.models.nets3d import build_model, n_input_channels
        from cerebseg.models.inference import predict
        from cerebseg.training.cascade import stage_arrays

        stage, idx = what.split(':')
        if stage == 'paper':  # the paper's widths, untrained: cost only
            meta = dict(lob[0][1])
            model = build_model(idx, n_input_channels(meta['inputs'], len(labels) - 1),
                                len(labels)).eval()
            stage = 'lobules'
        else:
            model, meta = (hemi if stage == 'hemisphere' else lob)[int(idx)]
        factor = round(meta['spacing'] / SPACING)
        image, _, _ = stage_arrays(subject, stage, meta['inputs'], labels, factor)
        image = np.asarray(image)
        before = reset_peak()
        tic = time.perf_counter()
        predict(model, image)
    seconds = time.perf_counter() - tic
    queue.put((seconds, before, _rss_gb('VmHWM'), subject.t1.shape))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--assets-dir', required=True)
    parser.add_argument('--library', default='suit')
    parser.add_argument('--bids', type=Path, default=ROOT.parent / 'shared/data/bids/ds002748')
    parser.add_argument('--labels', type=Path, required=True,
                        help='derivatives folder with the reference labels of --test')
    parser.add_argument('--work-dir', type=Path, required=True)
    parser.add_argument('--test', nargs='*', default=['01', '02', '60', '61', '62'])
    parser.add_argument('--weights', action='append', default=[], metavar='NAME=MANIFEST',
                        help="weights manifests; a NAME ending in 'noprior' runs without the "
                             "prior, one ending in 't2w' with the T2w where a case has one")
    parser.add_argument('--known', type=int, default=3, help='known-deformation cases')
    parser.add_argument('--max-mm', type=float, default=4.0)
    parser.add_argument('--seed', type=int, default=11)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--per-label', default=None, metavar='METHOD')
    parser.add_argument('--timing', action='store_true')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cerebseg.assets.locate import load_assets

    assets = load_assets(args.assets_dir)
    library = assets.library_paths(args.library)
    labels = read_lut(library['lut'])
    manifests = dict(w.split('=', 1) for w in args.weights)
    values = [v for v, _ in labels[1:]]
    names = [n for _, n in labels[1:]]
    groups = {'held-out subjects (silver labels)': held_out_cases(args, assets, library),
              'known deformations (exact labels)': known_cases(args, assets, library)}
    for title, cases in groups.items():
        if not cases:
            continue
        scores = {}  # method -> {case: per-label Dice + whole-cerebellum Dice}
        for cname, subject in cases:
            tic = time.perf_counter()
            preds = predictions(subject, labels, manifests, args)
            truth = subject.classes  # class index == label value for the library protocols
            for method, pred in preds.items():
                row = list(dice_per_label(pred, truth, values)) + [whole_dice(pred, truth)]
                scores.setdefault(method, {})[cname] = row
            print(f'# {cname}: {len(preds)} methods, {time.perf_counter() - tic:.0f} s',
                  flush=True)
        print(f'\n## {title}: {len(cases)} cases')
        print('| method | cases | mean lobule Dice, mean (sd) | whole cerebellum Dice | '
              'p vs prior (per-case mean Dice, Wilcoxon) |')
        print('|---|---|---|---|---|')
        for method, by_case in scores.items():
            s_arr = np.array(list(by_case.values()))
            per_case = np.nanmean(s_arr[:, :-1], axis=1)
            base = np.array([np.nanmean(scores['prior'][c][:-1]) for c in by_case])
            p = '' if method == 'prior' else f'{wilcoxon_p(per_case, base):.2g}'
            sd = per_case.std(ddof=1) if len(per_case) > 1 else 0.0
            print(f'| {method} | {len(per_case)} | {per_case.mean():.4f} ({sd:.4f}) | '
                  f'{np.nanmean(s_arr[:, -1]):.4f} | {p} |')
        if args.per_label and args.per_label in scores:
            cases_m = list(scores[args.per_label])
            arrays = {k: np.array([scores[k][c] for c in cases_m])
                      for k in ('prior', args.per_label)}
            rows = scores_table(arrays, names)
            text, _ = format_table(rows, ['prior', args.per_label],
                                   [(args.per_label, 'prior')])
            print(f'\n{text}')
    if args.timing and manifests:
        args.timing_manifest = next(iter(manifests.values()))
        w = ckpt.select_weights(args.timing_manifest, t2w=False, prior=True,
                                   protocol=args.library)
        what = ['hemisphere:0'] + [f'lobules:{i}' for i in range(len(w['lobules']['files']))] \
            + ['paper:unet', 'paper:dpn', 'cascade']
        names_t = ['hemisphere ' + w['hemisphere']['architectures'][0]] + \
            ['lobules ' + a for a in w['lobules']['architectures']] + \
            ['lobules unet, paper widths (untrained)', 'lobules dpn, paper widths (untrained)',
             'whole cascade (shipped ensemble)']
        ctx = mp.get_context('spawn')
        print(f'\n## CPU inference, {args.threads} threads, one held-out subject')
        print('| network | working-grid crop | seconds | peak memory (GB) | memory before (GB, '
              'data and weights loaded) |')
        print('|---|---|---|---|---|')
        for label, item in zip(names_t, what):
            queue = ctx.Queue()
            proc = ctx.Process(target=timing_child, args=(queue, args, item))
            proc.start()
            seconds, before, peak, shape = queue.get()
            proc.join()
            print(f'| {label} | {shape} | {seconds:.1f} | {peak:.2f} | {before:.2f} |',
                  flush=True)


if __name__ == '__main__':
    main()
