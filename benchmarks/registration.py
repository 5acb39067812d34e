"""Known-deformation registration benchmark: ANTs affine, ANTs SyN, torch SVF (and the network).

Cases, all on the 0.5 mm working grid with the SUIT lobule labels (``--assets-dir``):

* **templates**: each SUIT library entry ``j`` (its T1w and its labels) is deformed by a random
  smooth diffeomorphism (a stationary velocity field drawn on an 8 mm lattice, largest component
  ``--max-mm``, integrated by scaling and squaring; seeded), and its intensities changed (smooth
  multiplicative bias field of +-20 %, a gamma of 0.8-1.25, Gaussian noise of 3 % of the white
  matter level, then re-normalised as cerebseg does). That image is the subject. Every entry is
  registered onto it: entry ``j`` itself gives a *known-deformation* score (truth: entry ``j``'s
  labels under the same deformation); the other entries give a *cross-template* score against
  the same truth (the three templates carry the same SUIT atlas, so this is the realistic
  inter-subject case, with the atlas's own template normalisation as reference).
* **real T1w**: subjects of a BIDS dataset (``--bids``; default ds002748 sub-01 and sub-02,
  which the network never saw) are placed in the box affinely, labelled with the SUIT entry's
  labels (pseudo-labels: only their shape matters here), deformed and altered as above and
  registered back (known-deformation).

Methods: ``affine`` (ANTs, 2 mm, inside the entry's field of view: the first stage of the SyN
path), ``syn`` (the cerebseg ANTs path: that affine then SyNOnly at 1 mm, 40x20x0), ``torch``
(:func:`cerebseg.models.registration.register_svf`, all entries of a subject in one batch),
``net`` (the registration network alone, when weights exist) and ``net+io`` (network, then
instance optimisation with fewer iterations).

Reported per method: mean lobule Dice (labels present in the truth, averaged over labels then
cases), the percentage of folding voxels (Jacobian determinant <= 0 of the recovered mapping,
inside the dilated cerebellum of the truth, where the labels are used), and the wall time per
entry (registration plus warping the labels to 0.5 mm; torch: batch time / K).

Usage: python benchmarks/registration.py --assets-dir .assets [--threads 2] [--device auto]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault('NIPYPE_NO_ET', '1')

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from cerebseg.assets.locate import load_assets  # noqa: E402
from cerebseg.models import registration as reg  # noqa: E402
from cerebseg.models import warp as wp  # noqa: E402
from cerebseg.training import augment as aug  # noqa: E402
from cerebseg.models.inference import resolve_device  # noqa: E402
from cerebseg.utils.preproc import normalise_intensity  # noqa: E402

SPACING = 0.5


def load_entries(assets, library='suit'):
    lib = assets.library(library)
    names, t1, lab = [], [], []
    for entry in lib['entries']:
        names.append(entry['name'])
        t1.append(np.asarray(nib.load(assets.path(entry['files']['t1w'])).dataobj, np.float32))
        lab.append(np.asarray(nib.load(assets.path(entry['files']['dseg'])).dataobj, np.int16))
    return names, np.stack(t1), np.stack(lab), int(lib['n_labels'])


def alter_intensities(image, rng):
    """Bias field, contrast (gamma) and noise, then cerebseg's normalisation."""
    shape = image.shape
    low = rng.standard_normal(tuple(max(s // 32, 2) for s in shape))
    bias = ndimage.zoom(ndimage.gaussian_filter(low, 1.0), [s / n for s, n in
                                                           zip(shape, low.shape)], order=1)
    bias = np.exp(0.2 * bias / (np.abs(bias).max() + 1e-9))[:shape[0], :shape[1], :shape[2]]
    out = np.clip(image, 0, None) ** rng.uniform(0.8, 1.25) * bias
    out = out + rng.normal(0, 0.03, shape) * (image > 0)
    return normalise_intensity(np.clip(out, 0, None).astype(np.float32))


def dice(pred, truth):
    scores = []
    for lab in np.unique(truth):
        if lab == 0:
            continue
        a, b = pred == lab, truth == lab
        scores.append(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(scores))


def index_images(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                                indexing='ij'))


def folding_percent(mapping_vox, region):
    """% of ``region`` voxels where the mapping (moving voxel index per fixed voxel) folds."""
    det = wp.jacobian_determinant(mapping_vox, 1.0)
    return 100.0 * float((det[region] <= 0).mean())


def run_ants(method, fixed, moving, labels, seed, threads):
    import ants

    from cerebseg.utils.images import nib_to_ants
    from cerebseg.utils.registration import affine_fov_to, fov_mask_image, set_threads, syn_to

    set_threads(threads)
    affine = np.diag([SPACING] * 3 + [1.0])
    to_ants = lambda a: nib_to_ants(nib.Nifti1Image(np.asarray(a, np.float32), affine))  # noqa
    f_img, m_img = to_ants(fixed), to_ants(moving)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        if method == 'affine':
            transforms = affine_fov_to(f_img, m_img, fov_mask_image(m_img), tmp, seed)
        else:
            transforms = syn_to(f_img, m_img, str(Path(tmp) / 'syn_'), seed)
        warped = ants.apply_transforms(f_img, to_ants(labels), transforms,
                                       interpolator='genericLabel').numpy()
        seconds = time.perf_counter() - tic
        coords = np.stack([ants.apply_transforms(f_img, to_ants(c), transforms,
                                                 interpolator='linear').numpy()
                           for c in index_images(fixed.shape)])
    return np.rint(warped).astype(np.int16), coords, seconds


def run_torch(fixed, moving, labels, device, config, init=None):
    tic = time.perf_counter()
    init_velocity = None
    if init is not None:
        init_velocity = init(fixed, moving)
    result = reg.register_svf(fixed, moving, spacing=SPACING, config=config, device=device,
                              init_velocity=init_velocity)
    warped = reg.apply_svf(result, labels, order=0, device=device)
    seconds = (time.perf_counter() - tic) / len(moving)
    coords = reg.apply_svf(result, np.repeat(index_images(fixed.shape)[None], len(moving), 0),
                           device=device)
    return warped, coords, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--assets-dir', required=True)
    parser.add_argument('--bids', default=str(Path(__file__).resolve().parents[1].parent
                                              / 'shared' / 'data' / 'bids' / 'ds002748'))
    parser.add_argument('--participants', nargs='*', default=['01', '02'])
    parser.add_argument('--max-mm', type=float, default=4.0)
    parser.add_argument('--seed', type=int, default=7)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--methods', nargs='+',
                        default=['affine', 'syn', 'torch', 'net', 'net+io'])
    parser.add_argument('--regnet', default=None,
                        help='registration network checkpoint (default: the packaged one)')
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    assets = load_assets(args.assets_dir)
    names, t1, lab, _ = load_entries(assets)
    rng = np.random.default_rng(args.seed)

    cases = []  # (name, fixed, truth, moving (K,...), labels (K,...), kinds)
    for j, name in enumerate(names):
        velocity = aug.random_velocity(t1.shape[1:], SPACING, seed=args.seed + j,
                                       max_mm=args.max_mm)
        fixed = alter_intensities(aug.random_deformation(t1[j:j + 1], velocity, SPACING)[0], rng)
        truth = aug.random_deformation(lab[j:j + 1], velocity, SPACING, order=0)[0]
        kinds = ['known' if k == j else 'cross' for k in range(len(names))]
        cases.append((f'template {name}', fixed, truth, t1, lab, kinds))
    from cerebseg.utils.registration import affine_to_box
    for i, part in enumerate(args.participants):
        path = Path(args.bids) / f'sub-{part}' / 'anat' / f'sub-{part}_T1w.nii.gz'
        image, _ = affine_to_box(str(path), assets, seed=args.seed)
        velocity = aug.random_velocity(image.shape, SPACING, seed=args.seed + 100 + i,
                                       max_mm=args.max_mm)
        fixed = alter_intensities(aug.random_deformation(image[None], velocity, SPACING)[0], rng)
        truth = aug.random_deformation(lab[:1], velocity, SPACING, order=0)[0]
        cases.append((f'real sub-{part}', fixed, truth, image[None], lab[:1], ['real']))

    net_init = None
    if any(m.startswith('net') for m in args.methods):
        from cerebseg.models.checkpoint import load_regnet
        from cerebseg.models.regnet import predict_velocity
        try:
            net = load_regnet(args.regnet, device=device)
        except FileNotFoundError as err:
            print(f'# no registration network ({err}); net rows skipped')
            args.methods = [m for m in args.methods if not m.startswith('net')]
        else:
            net_init = lambda f, m: predict_velocity(net, f, m, SPACING, device)  # noqa: E731

    io_config, refine = reg.SVFConfig(), reg.REFINE_CONFIG
    rows = {m: {'known': [], 'cross': [], 'real': [], 'fold': [], 'sec': []}
            for m in args.methods}
    baseline = {'known': [], 'cross': [], 'real': []}
    for cname, fixed, truth, moving, labels, kinds in cases:
        region = ndimage.binary_dilation(truth > 0, iterations=4)
        for k, kind in enumerate(kinds):
            baseline[kind].append(dice(labels[k], truth))
        for method in args.methods:
            if method in ('affine', 'syn'):
                outs = [run_ants(method, fixed, moving[k], labels[k], args.seed, args.threads)
                        for k in range(len(moving))]
                warped = [o[0] for o in outs]
                coords = [o[1] for o in outs]
                seconds = [o[2] for o in outs]
            else:
                if method == 'torch':
                    w, c, s = run_torch(fixed, moving, labels, device, io_config)
                elif method == 'net':
                    w, c, s = run_torch(fixed, moving, labels, device,
                                        reg.SVFConfig(iterations=(0, 0, 0), affine_iterations=0),
                                        init=net_init)
                else:
                    w, c, s = run_torch(fixed, moving, labels, device, refine, init=net_init)
                warped, coords, seconds = list(w), list(c), [s] * len(moving)
            for k, kind in enumerate(kinds):
                rows[method][kind].append(dice(warped[k], truth))
                rows[method]['fold'].append(folding_percent(coords[k], region))
                rows[method]['sec'].append(seconds[k])
            print(f'# {cname:28s} {method:7s} dice ' + ' '.join(
                f'{kind}={dice(warped[k], truth):.3f}' for k, kind in enumerate(kinds))
                + f'  {np.mean(seconds):.1f} s/entry', flush=True)

    mean = lambda v: f'{np.mean(v):.3f}' if v else '-'  # noqa: E731
    print(f'\n## Registration, known deformations (max {args.max_mm:g} mm), {device.type}, '
          f'{args.threads} threads; mean lobule Dice over '
          f'{sum(k == "known" for c in cases for k in c[5])} known / '
          f'{sum(k == "cross" for c in cases for k in c[5])} cross / '
          f'{sum(k == "real" for c in cases for k in c[5])} real cases\n')
    print('| method | Dice known (templates) | Dice known (real T1w) | Dice cross-template | '
          'folding % (max) | s per entry | vs SyN |')
    print('|---|---|---|---|---|---|---|')
    print(f'| none (identity) | {mean(baseline["known"])} | {mean(baseline["real"])} | '
          f'{mean(baseline["cross"])} | 0 | 0 | |')
    syn_sec = np.mean(rows['syn']['sec']) if 'syn' in rows else None
    for method, r in rows.items():
        speed = f'{syn_sec / np.mean(r["sec"]):.1f}x faster' if syn_sec else ''
        print(f'| {method} | {mean(r["known"])} | {mean(r["real"])} | {mean(r["cross"])} | '
              f'{np.mean(r["fold"]):.4f} ({np.max(r["fold"]):.4f}) | '
              f'{np.mean(r["sec"]):.2f} | {speed} |')


if __name__ == '__main__':
    main()
