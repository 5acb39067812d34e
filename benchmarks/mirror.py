"""Left-right equivariance: a mirrored input must give mirrored labels.

For each T1w given, a BIDS dataset holds the image and its left-right mirror (the voxel axis
closest to world x reversed, the affine unchanged: the head mirrored about a sagittal plane).
Both go through the real ``cerebseg`` command with the options given after ``--``; the mirror's
labels are mirrored back (axis reversed, left and right labels swapped) and compared with the
original's: Dice per label (mean over labels, and over the large lobules), whole-cerebellum Dice,
and the left/right volumes of both runs.

Re-running with the same ``--out`` and other options reuses the work folder (the inputs are
written once): ``-- --lobule-borders fused`` after ``-- --lobule-borders branches`` only runs
what follows the fusion again.

Usage::

    python benchmarks/mirror.py --assets-dir .assets --out MIRROR \\
        --t1w ../shared/data/bids/ds002748/sub-01/anat/sub-01_T1w.nii.gz -- --models none
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from common import run_cerebseg, split_options

LARGE = ('CrusI', 'CrusII', 'VI', 'VIIb', 'VIIIa', 'VIIIb', 'IX', 'I_IV', 'V')
#: the same lobules in the CERES protocol's names (``..._Lobule_<stem>``; I-IV is split there)
CERES_LARGE = ('Crus_I', 'Crus_II', 'VI', 'VIIB', 'VIIIA', 'VIIIB', 'IX', 'V')


def is_large(name: str) -> bool:
    if '_Lobule_' in name:
        return name.rsplit('_Lobule_', 1)[-1] in CERES_LARGE
    return name.split('_', 1)[-1] in LARGE


def x_axis(affine: np.ndarray) -> int:
    """The voxel axis most aligned with world x."""
    return int(np.argmax(np.abs(affine[0, :3])))


def main(argv=None) -> int:
    argv, extra = split_options(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--assets-dir', type=Path, required=True)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--t1w', type=Path, nargs='+', required=True)
    opts = parser.parse_args(argv)
    from cerebseg.utils.evaluation import dice_per_label, whole_dice
    from cerebseg.utils.labels import swap_classes
    from cerebseg.utils.native import read_lut_tsv

    out = opts.out.resolve()
    bids = out / 'bids'
    bids.mkdir(parents=True, exist_ok=True)
    (bids / 'dataset_description.json').write_text(json.dumps(
        {'Name': 'mirror check', 'BIDSVersion': '1.10.0'}))
    labels = []
    for i, path in enumerate(opts.t1w):
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        for tag, arr in (('orig', data), ('mirror', np.flip(data, x_axis(img.affine)))):
            lab = f'm{i}{tag}'
            dst = bids / f'sub-{lab}' / 'anat' / f'sub-{lab}_T1w.nii.gz'
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.is_file():   # rewritten, the work folder's nodes would all run again
                nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), img.affine, img.header), dst)
            labels.append(lab)
    result = out / 'out'
    run_cerebseg(bids, result, out / 'work', opts.assets_dir,
                 ['--participant-label', *labels, *extra], out / 'cerebseg.log')
    lut = read_lut_tsv(result / 'seg-cerebellum_dseg.tsv')
    swap = swap_classes([[r['index'], r['name']] for r in lut])
    names = [r['name'] for r in lut[1:]]
    large = [i for i, n in enumerate(names) if is_large(n)]
    print(f'options: {" ".join(extra) or "(defaults)"}\n')
    print('| T1w | mean Dice over labels | large lobules | whole cerebellum | '
          'L / R volume mL (orig) | L / R volume mL (mirror) |')
    print('|---|---|---|---|---|---|')
    for i, path in enumerate(opts.t1w):
        def load(tag):
            lab = f'm{i}{tag}'
            return nib.load(result / f'sub-{lab}' / 'anat' /
                            f'sub-{lab}_space-T1w_seg-cerebellum_dseg.nii.gz')

        orig, mirror = load('orig'), load('mirror')
        a = np.asarray(orig.dataobj)
        b = swap[np.flip(np.asarray(mirror.dataobj), x_axis(mirror.affine)).astype(np.int64)]
        dice = dice_per_label(b, a, range(1, len(lut)))
        voxel = float(np.prod(orig.header.get_zooms()[:3])) / 1000

        def sides(arr):
            left = sum((arr == r['index']).sum() for r in lut if r['name'].startswith('Left'))
            right = sum((arr == r['index']).sum() for r in lut if r['name'].startswith('Right'))
            return f'{left * voxel:.1f} / {right * voxel:.1f}'

        print(f'| {Path(path).name} | {np.nanmean(dice):.4f} | {np.nanmean(dice[large]):.4f} | '
              f'{whole_dice(a, b):.4f} | {sides(a)} | {sides(np.asarray(mirror.dataobj))} |')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
