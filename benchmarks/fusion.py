"""Label fusion: compiled kernel (1 and 2 threads) vs its NumPy twin vs ANTs joint label fusion.

Cases are built from the real atlas library (``--assets-dir``): the target is one library entry
(its image plus noise) under a known random smooth deformation, so its labels are the exact
truth; the K atlases are the library entries under other random deformations (entries reused
when K > 3). Everything is on the 0.5 mm working grid with the 35 SUIT labels.

Prints, for K = 4, 8, 16: seconds per fusion (best of ``--repeat`` runs after a warm-up), speed-up
over NumPy, mean Dice against the truth, the memory-bandwidth bound and the time against it. The
bound is the bytes the fusion must move at least, read once or written once: all of its inputs
(labels, atlas and target images) plus the outputs it returns (the kernel: fused labels, and the
flat index and L float32 probabilities of each voxel where the atlases disagree; the twin and
``.dense()``: fused labels and the (L, X, Y, Z) float32 probabilities), divided by the
bandwidth of a NumPy copy (read + write) measured in the same run. The kernel reads the images
only near disagreements, so it may in principle come under that bound. ANTs
``joint_label_fusion`` runs on a 64^3 crop only (it takes minutes per atlas on the whole grid);
its row says so.

Usage: python benchmarks/fusion.py --assets-dir .assets [--k 4 8 16] [--jlf]
"""
from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from cerebseg.kernels.wmv import compiled_kernel, weighted_majority_vote, \
    weighted_majority_vote_numpy

ENTRIES = ('SUIT', 'MNI152NLin6AsymC', 'MNI152NLin2009cSymC')


def random_warp(shape, rng, amplitude=2.0, smooth=12.0):
    """A smooth random displacement field (voxels), (3, X, Y, Z)."""
    low = [s // 4 for s in shape]
    disp = []
    for _ in range(3):
        field = gaussian_filter(rng.standard_normal(low), smooth / 4)
        field *= amplitude / (np.abs(field).max() + 1e-9)
        zoom = [s / lo for s, lo in zip(shape, low)]
        grid = np.meshgrid(*[np.arange(s) / z for s, z in zip(shape, zoom)], indexing='ij')
        disp.append(map_coordinates(field, grid, order=1, mode='nearest'))
    return np.stack(disp).astype(np.float32)


def warp(vol, disp, order):
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in vol.shape], indexing='ij')
    coords = [g + d for g, d in zip(grid, disp)]
    return map_coordinates(vol, coords, order=order, mode='nearest')


def dice(a, b, n_labels):
    scores = []
    for lab in range(1, n_labels):
        x, y = a == lab, b == lab
        denom = x.sum() + y.sum()
        if denom:
            scores.append(2.0 * (x & y).sum() / denom)
    return float(np.mean(scores))


def make_case(lib: Path, k: int, seed: int):
    rng = np.random.default_rng(seed)
    imgs = [np.asarray(nib.load(lib / f'entry-{n}_T1w.nii.gz').dataobj, np.float32)
            for n in ENTRIES]
    labs = [np.asarray(nib.load(lib / f'entry-{n}_dseg.nii.gz').dataobj, np.int16)
            for n in ENTRIES]
    shape = imgs[0].shape
    t_disp = random_warp(shape, rng)
    target = warp(imgs[0], t_disp, 1) + 0.03 * rng.standard_normal(shape).astype(np.float32)
    truth = warp(labs[0], t_disp, 0).astype(np.int16)
    atlas_imgs, atlas_labs = [], []
    for i in range(k):
        src = 1 + i % 2 if i < k - 1 else 0  # mostly the other entries, one the same template
        disp = random_warp(shape, rng)
        atlas_imgs.append(warp(imgs[src], disp, 1))
        atlas_labs.append(warp(labs[src], disp, 0).astype(np.int16))
    return np.stack(atlas_labs), np.stack(atlas_imgs), target.astype(np.float32), truth


def bandwidth_gbs(nbytes=1 << 30) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_of(fn, repeat):
    runs = [timed(fn) for _ in range(max(repeat, 1))]
    return min(r[0] for r in runs), runs[-1][1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--assets-dir', required=True, type=Path)
    parser.add_argument('--k', type=int, nargs='+', default=[4, 8, 16])
    parser.add_argument('--jlf', action='store_true', help='add ANTs joint label fusion')
    parser.add_argument('--repeat', type=int, default=3, help='timed runs (best is shown)')
    opts = parser.parse_args(argv)
    lib = opts.assets_dir / 'suit'
    n_labels = 35
    bw = bandwidth_gbs()
    print(f'memory bandwidth (NumPy copy, read + write): {bw:.1f} GB/s')
    print(f'compiled kernel: {"yes" if compiled_kernel() else "NOT BUILT"}\n')
    print('| K | method | seconds | speed-up vs NumPy | mean Dice | bound (ms) | '
          'time / bound |')
    print('|---|---|---|---|---|---|---|')
    for k in opts.k:
        labels, images, target, truth = make_case(lib, k, seed=k)
        n_vox = target.size
        inputs = labels.nbytes + images.nbytes + target.nbytes
        dense_bound = (inputs + n_labels * n_vox * 4 + n_vox * 2) / (bw * 1e9)

        def row(method, seconds, fused, bound, t_ref, k=k, truth=truth):
            print(f'| {k} | {method} | {seconds:.3f} | {t_ref / seconds:.1f} | '
                  f'{dice(fused, truth, n_labels):.4f} | {bound * 1e3:.1f} | '
                  f'{seconds / bound:.2f} |', flush=True)

        t_np, (f_np, _) = timed(partial(weighted_majority_vote_numpy, labels, images, target,
                                        n_labels))
        row('NumPy twin', t_np, f_np, dense_bound, t_np)
        for threads in (1, 2) if compiled_kernel() else ():
            run = partial(weighted_majority_vote, labels, images, target, n_labels,
                          use_compiled=True, num_threads=threads)
            run()  # warm-up: threads, code
            t_k, res = best_of(run, opts.repeat)
            bound = (inputs + res.fused.nbytes + res.index.nbytes + res.probs.nbytes) / (bw * 1e9)
            row(f'kernel, {threads} thread(s)', t_k, res.fused, bound, t_np)
            if threads == 2:  # the old API: dense (L, X, Y, Z) probabilities
                t_d, _ = best_of(lambda run=run: run().dense(), opts.repeat)
                row('kernel, 2 threads, + .dense()', t_d, res.fused, dense_bound, t_np)
        maj = np.apply_along_axis(lambda v: np.bincount(v, minlength=n_labels).argmax(), 0,
                                  labels[:, ::4, ::4, ::4])
        print(f'| {k} | plain majority vote (1/4 grid) | - | - | '
              f'{dice(maj, truth[::4, ::4, ::4], n_labels):.4f} | - | - |', flush=True)
        if opts.jlf:
            import ants

            crop = (slice(94, 158), slice(58, 122), slice(49, 113))
            to_img = lambda a: ants.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
            t_j, jlf = timed(lambda: ants.joint_label_fusion(
                to_img(target[crop]), to_img(np.ones(target[crop].shape)),
                [to_img(im[crop]) for im in images],
                label_list=[to_img(lb[crop]) for lb in labels],
                rad=2, verbose=False))
            fused = jlf['segmentation'].numpy().astype(int)
            t_kc, (f_kc, _, _) = timed(lambda: weighted_majority_vote(
                labels[(slice(None),) + crop], images[(slice(None),) + crop], target[crop],
                n_labels, num_threads=2))
            print(f'| {k} | antsJointFusion, 64^3 crop | {t_j:.2f} | kernel on the same '
                  f'crop: {t_kc:.2f} s | {dice(fused, truth[crop], n_labels):.4f} (kernel '
                  f'{dice(f_kc, truth[crop], n_labels):.4f}) | - | - |', flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
