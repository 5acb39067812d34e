"""Train the CERES-protocol lobule network (``--atlas-library cobra``) on images synthesised
from the CoBrALab manual lobule maps, leaving one map out (issue 22, item 3).

Every step is resumable: run the same command again and it continues where it stopped (cases
and priors are cached, training resumes from ``OUT/<name>.pt.state.pt``).

1. **Cases**: for each training map (every map but ``--held-out``), ``--seeds`` whole-head T1w
   images synthesised from its labels as in ``benchmarks/real_anatomy.py`` (map placed in
   MNI152NLin2009cAsym's posterior fossa, tissue levels, cortical thickness and fissure CSF
   drawn per case, random affine and smooth displacement, anisotropic reoriented grid, bias,
   contrast, Rician noise; ``--supersample``^3 sub-samples per voxel), written as BIDS, with
   their exact labels on the native grid as the reference.
2. **Priors**: each case's preprocessing and multi-atlas prior, computed by the pipeline itself
   (``cerebseg-train segmentation --prepare-only``, fusion and lobule borders as the run will
   use: the protocol's by default)
   from a library that holds neither the held-out map nor the case's own map (nor their
   mirrors): the prior the pipeline gives a person it has no atlas of.
3. **Training**: ``cerebseg-train segmentation --stage lobules`` on every case but one,
   validated after each epoch on the last case of the last training map; the best checkpoint
   by validation Dice is kept.

Usage::

    python scripts/train_ceres.py --assets-dir ASSETS --out OUT [--held-out 1]
        [--seeds 11 12 13 14] [--epochs 15] [--architecture unet] [--features 8 16 32 64 64]
        [--t2w --init OUT/lobules_unet_cobra_T1w-prior.pt]

``--t2w``: the cases have a T2w as well (labelled ``brain<k>w<seed>``; the T2w painted as in
``real_anatomy.py --t2w``) and the network reads T1w, T2w and the prior; ``--init`` starts it
from the T1w+prior network of the same architecture (the T2w input at zero weight), as the
shipped SUIT-protocol T1w+T2w networks were made.

``--recede MM ...``: every case also atrophied by each MM (the surface and the fissures' banks
receding, CSF in their place; the same drawing otherwise, labelled ``...r<MM x 100>``), so that
the network sees anatomy that departs from the maps; the validation case's copies are left out.
``--held-out 0``: every map trains (the weights that ship).

``ASSETS``: ``cerebseg-assets build --library suit --library cobra`` (the cobra library with
its manual entries). The held-out map's case is then scored end to end by
``benchmarks/real_anatomy.py --cnn-weights OUT/deepceres_cobra.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
os.environ.setdefault('NIPYPE_NO_ET', '1')


def labels_folder(truth_dir: Path, out: Path, labels: list[str]) -> Path:
    """The truth maps as a derivatives folder (``sub-X/anat/sub-X_space-T1w_dseg.nii.gz``,
    links) as ``cerebseg-train`` reads it."""
    for label in labels:
        anat = out / f'sub-{label}' / 'anat'
        anat.mkdir(parents=True, exist_ok=True)
        link = anat / f'sub-{label}_space-T1w_dseg.nii.gz'
        if not link.exists():
            link.symlink_to(truth_dir / f'sub-{label}_space-T1w_seg-cerebellum_dseg.nii.gz')
    return out


def main(argv=None) -> int:
    from real_anatomy import entry_name, write_bids_root, write_case

    from cerebseg.assets.build import leave_out_entry
    from cerebseg.bids_app.parser import FUSION_SEARCH_CHOICES
    from cerebseg.models.losses import LOSSES

    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--assets-dir', type=Path, required=True)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--held-out', type=int, default=1, choices=[0, 1, 2, 3],
                        help='the map no case, library entry or weight has seen (0: none, '
                             'every map trains: the weights that ship)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[11, 12, 13, 14],
                        help='cases per training map (the last case of the last map validates)')
    parser.add_argument('--supersample', type=int, default=2)
    parser.add_argument('--anatomy-cache', type=Path, default=None,
                        help='placed maps (default OUT/anatomy; real_anatomy.py\'s can be '
                             'shared)')
    parser.add_argument('--fusion-search', default='auto', choices=FUSION_SEARCH_CHOICES)
    parser.add_argument('--architecture', default='unet')
    parser.add_argument('--features', type=int, nargs='+', default=[8, 16, 32, 64, 64])
    parser.add_argument('--patch-size', type=int, default=48)
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--steps-per-epoch', type=int, default=200)
    parser.add_argument('--learning-rate', type=float, default=1e-3)
    parser.add_argument('--nthreads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--simulated-prior', type=float, default=0.0,
                        help='share of patches whose prior is simulated from their labels')
    parser.add_argument('--loss', default='deepceres', choices=sorted(LOSSES))
    parser.add_argument('--t2w', action='store_true',
                        help='cases with a T2w; the network reads T1w, T2w and the prior')
    parser.add_argument('--init', type=Path, default=None,
                        help='start from this checkpoint (e.g. the T1w+prior network, for --t2w)')
    parser.add_argument('--manifest', type=Path, nargs='+', default=None,
                        help='with --manifest-only: the lobule checkpoints to list')
    parser.add_argument('--manifest-only', action='store_true',
                        help='only write OUT/deepceres_cobra<tag>.json for the --manifest '
                             'checkpoints (their inputs decide the variant)')
    parser.add_argument('--tag', default='', help='suffix of the checkpoint and manifest names')
    parser.add_argument('--recede', type=float, nargs='+', default=[], metavar='MM',
                        help='atrophied copies of every case: the cerebellar surface and the '
                             'fissures\' banks receded by each MM (real_anatomy.py --recede); '
                             'those of the validation case are left out')
    parser.add_argument('--prepare-only', action='store_true')
    opts = parser.parse_args(argv)
    if len(opts.seeds) < 2:
        parser.error('--seeds needs at least two seeds (the last one validates)')
    out = opts.out.resolve()
    if opts.manifest_only:
        print(f'weights manifest: {write_manifest(out, opts.manifest or [], opts.tag)}')
        return 0
    bids, truth_dir = out / 'bids', out / 'truth'
    cache = (opts.anatomy_cache or out / 'anatomy').resolve()
    assets = opts.assets_dir.resolve()
    maps = [k for k in (1, 2, 3) if k != opts.held_out]
    cases = {}
    copies = {}   # (map, seed) -> the intact case, then its atrophied copies
    for k in maps:
        for seed in opts.seeds:
            for mm in [0.0, *opts.recede]:
                tic = time.perf_counter()
                label = write_case(bids, truth_dir, cache, k, seed,
                                   tag='w' if opts.t2w else 't', supersample=opts.supersample,
                                   t2w=opts.t2w, recede_mm=mm)
                cases.setdefault(k, []).append(label)
                copies.setdefault((k, seed), []).append(label)
                print(f'case sub-{label}: {time.perf_counter() - tic:.0f} s', flush=True)
    labels = [lab for k in maps for lab in cases[k]]
    write_bids_root(bids, labels)
    deriv = labels_folder(truth_dir, out / 'labels', labels)
    # one case, a whole-volume inference per epoch: the last seed of the last map, whose
    # atrophied copies are not trained on either
    last = copies[maps[-1], opts.seeds[-1]]
    validation = last[:1]
    train = [lab for lab in labels if lab not in last]
    work = out / 'work'
    common = [sys.executable, '-m', 'cerebseg.bids_app.train', 'segmentation', str(bids),
              '--labels', str(deriv), '--atlas-library', 'cobra', '--work-dir', str(work),
              '--fusion-search', str(opts.fusion_search), '--nthreads', str(opts.nthreads)]
    inputs = ['T1w', 'T2w', 'prior'] if opts.t2w else ['T1w', 'prior']   # prepared with them
    held = [opts.held_out] if opts.held_out else []

    def library(k):   # the prior of a case of map k: neither the held-out map nor map k
        return out / f'assets-no{"".join(map(str, held + [k]))}'

    for k in maps:
        lib = leave_out_entry(assets, library(k), [entry_name(m) for m in held + [k]])
        tic = time.perf_counter()
        subprocess.run(common + ['--assets-dir', str(lib), '--prepare-only', '--inputs', *inputs,
                                 '--participant-label', *cases[k]], check=True)
        print(f'priors of map {k}: {time.perf_counter() - tic:.0f} s', flush=True)
    if opts.prepare_only:
        return 0
    name = f'lobules_{opts.architecture}_cobra_{"-".join(inputs)}{opts.tag}'
    ckpt = out / f'{name}.pt'
    # each case's prior as prepared above, from its own library (--prepared); the assets given
    # here only name the protocol
    lib = library(maps[0])
    cmd = common + ['--assets-dir', str(lib), '--out', str(ckpt), '--resume', '--prepared',
                    '--stage', 'lobules', '--architecture', opts.architecture,
                    '--features', *map(str, opts.features), '--inputs', *inputs,
                    '--loss', opts.loss,
                    '--patch-size', str(opts.patch_size), '--batch-size', str(opts.batch_size),
                    '--epochs', str(opts.epochs), '--steps-per-epoch', str(opts.steps_per_epoch),
                    '--learning-rate', str(opts.learning_rate),
                    '--simulated-prior', str(opts.simulated_prior),
                    '--participant-label', *train, '--validation-label', *validation]
    if opts.init:
        cmd += ['--init', str(opts.init.resolve())]
    (out / f'training_command_{name}.json').write_text(json.dumps(cmd[1:], indent=1))
    subprocess.run(cmd, check=True)
    print(f'weights manifest: {write_manifest(out, [ckpt], opts.tag)}', flush=True)
    return 0


def write_manifest(out: Path, lobules: list[Path], tag: str = '') -> Path:
    """``OUT/deepceres_cobra<tag>.json``: the CERES-protocol cascade, the shipped hemisphere
    network (its classes, background / left / right, are every protocol's; copied beside it)
    and the lobule networks given, one variant per input set (``T1w+prior``,
    ``T1w+T2w+prior``; the shipped hemisphere network of that input set)."""
    import shutil

    from cerebseg.models.checkpoint import DEFAULT_CASCADE, read_cascade_checkpoint
    from cerebseg.utils.images import sha256sum

    shipped = json.loads(DEFAULT_CASCADE.read_text())['variants']
    variants = {}
    for path in map(Path, lobules):
        meta = read_cascade_checkpoint(path)
        if path.parent.resolve() != out:
            shutil.copyfile(path, out / path.name)
        variant = '+'.join(meta['inputs'])
        if variant not in variants:
            hemisphere = []
            for entry in shipped[variant]['hemisphere']:
                shutil.copyfile(DEFAULT_CASCADE.parent / entry['file'], out / entry['file'])
                hemisphere.append(dict(entry, sha256=sha256sum(out / entry['file'])))
            variants[variant] = {'hemisphere': hemisphere, 'lobules': []}
        variants[variant]['lobules'].append(
            {'file': path.name, 'architecture': meta['architecture'], 'inputs': meta['inputs'],
             'sha256': sha256sum(out / path.name)})
    manifest = out / f'deepceres_cobra{tag}.json'
    manifest.write_text(json.dumps({'protocol': 'cobra', 'variants': variants}, indent=2)
                        + '\n')
    return manifest


if __name__ == '__main__':
    sys.exit(main())
