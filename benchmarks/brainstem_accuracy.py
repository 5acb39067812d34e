"""Brainstem accuracy against exact truth, in native space (issue 10, item 9).

Cases (:mod:`cerebseg.utils.truth`): the FSL MNI152NLin6Asym 1 mm brain T1w with cerebseg's
brainstem label set in that space (:func:`cerebseg.assets.brainstem_atlas.build_label_set`, the space
where the label set is drawn), through a seeded random affine (rotations up to 10 degrees,
scales 0.9-1.1), a smooth random displacement (3 mm at most), bias, contrast and noise, on an
anisotropic, reoriented native grid; written as a BIDS dataset and run through the real
``cerebseg ... participant --skip-cerebellum``.

The method's atlas is not the cases' template: the assets carry the label set onto the
MNI152NLin2009cAsym brain (ANTs SyN at build time), and that image is what is registered to
each case. There is a single label set, so no template can be left out: the truth and the
atlas share their label definitions (a lower bound on the error real anatomy would show).

Methods (rows), on the same cases:

* ``cerebseg (default)``: the label set registered by cerebseg's diffeomorphic registration;
* ``cerebseg --brainstem-method network`` (``--methods network``): the 2D N-DecoNet (shipped
  weights, or ``--brainstem-weights``), trained on atlas labels of real subjects;
* ``ANTs SyN (antsRegistrationSyN defaults)``: the same template and labels registered onto
  the same brainstem box of each case by ANTs (rigid + affine + SyN, CC, 100x70x50x20), then
  to native through cerebseg's affine.

Scores on the native T1w grid: Dice of the whole brainstem, of midbrain / pons / medulla (the
union of each part's labels), mean Dice of the nuclei, signed total volume error and mean
absolute volume error of the parts and of the nuclei (% of the exact, partial-volume truth),
95 % Hausdorff distance of the whole brainstem.

Usage::

    python benchmarks/brainstem_accuracy.py --assets-dir ASSETS --out BENCH --seeds 1 2 3
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from accuracy import anat_file, box_to_native, case_folders, hd95, save_case, write_bids_root
from common import print_score_table, run_cerebseg, write_scores_tsv

from cerebseg.utils.brainstem_parts import PARTS
from cerebseg.workflows import workdir

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('CEREBSEG_SHARED_DATA', REPO.parent / 'shared' / 'data'))
T1W = 'templates/MNI152NLin6Asym/MNI152_T1_1mm_brain.nii.gz'
SEG = 'seg-brainstem'


def write_case(bids: Path, truth_dir: Path, seed: int, labels: nib.Nifti1Image,
               n_labels: int) -> str:
    from cerebseg.utils.truth import make_case

    label = f'bs{seed}'
    todo = case_folders(bids, truth_dir, label, SEG)
    if todo is None:
        return label
    anat, truth_file = todo
    case = make_case(nib.load(SHARED / T1W), labels, seed=seed, n_labels=n_labels)
    save_case(case, anat, truth_dir, label, truth_file)
    return label


def ants_full(t1_box: Path, template: Path, dseg: Path, seed: int = 0) -> nib.Nifti1Image:
    """The label-set template registered onto one case's brainstem box by ANTs SyN with the
    ``antsRegistrationSyN.sh`` defaults (rigid, affine, SyN with CC); its labels there."""
    import ants

    from cerebseg.utils.images import ants_to_nib, nib_to_ants
    from cerebseg.utils.registration import ants_seed

    fixed = nib_to_ants(nib.load(t1_box))
    moving = nib_to_ants(nib.load(template))
    with tempfile.TemporaryDirectory() as tmp, ants_seed(seed):
        reg = ants.registration(fixed, moving, type_of_transform='antsRegistrationSyN[s]',
                                outprefix=f'{tmp}/bs_')
        warped = ants.apply_transforms(fixed, nib_to_ants(nib.load(dseg)), reg['fwdtransforms'],
                                       interpolator='genericLabel')
    return ants_to_nib(warped)


def score(pred: np.ndarray, truth: np.ndarray, truth_vol: np.ndarray, lut: list[dict],
          zooms) -> dict:
    from cerebseg.utils.evaluation import dice_per_label

    n = len(truth_vol)
    voxel = float(np.prod(zooms))
    vols = np.bincount(pred.ravel().astype(np.int64), minlength=n)[:n] * voxel
    part_of = {r['index']: r.get('part') for r in lut}
    tissue = {r['index'] for r in lut if r['name'].endswith(('_GM', '_WM'))}
    nuclei = [i for i in range(1, n) if i not in tissue]

    def dice(a, b):
        return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))

    out = {'whole_dice': dice(pred > 0, truth > 0),
           'volume_error_pct': float((vols[1:].sum() / truth_vol[1:].sum() - 1) * 100),
           'hd95_mm': hd95(pred > 0, truth > 0, zooms)}
    part_err = []
    for part in PARTS:
        members = [i for i in range(1, n) if part_of.get(i) == part]
        out[f'{part}_dice'] = dice(np.isin(pred, members), np.isin(truth, members))
        part_err.append(abs(vols[members].sum() / truth_vol[members].sum() - 1) * 100)
    out['part_volume_abs_error_pct'] = float(np.mean(part_err))
    d = dice_per_label(pred, truth, nuclei)
    out['nuclei_dice'] = float(np.nanmean(d))
    present = [i for i in nuclei if truth_vol[i] > 0]
    out['nuclei_volume_abs_error_pct'] = float(np.mean(
        [abs(vols[i] / truth_vol[i] - 1) * 100 for i in present]))
    out['volume_ml'] = float(vols[1:].sum() / 1000)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--assets-dir', type=Path, required=True,
                        help='assets with the brainstem label set')
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    parser.add_argument('--methods', nargs='+', default=['default', 'ants'],
                        choices=['default', 'ants', 'network'])
    parser.add_argument('--brainstem-weights', type=Path, default=None,
                        help='network row: this checkpoint (default: the shipped weights)')
    parser.add_argument('--tsv', type=Path, default=None)
    opts = parser.parse_args(argv)
    os.environ.setdefault('NIPYPE_NO_ET', '1')
    from cerebseg.assets.brainstem_atlas import build_label_set
    from cerebseg.assets.locate import load_assets

    out = opts.out.resolve()
    bids, truth_dir = out / 'bids', out / 'truth'
    labels6, lut = build_label_set(SHARED)
    labels6 = nib.Nifti1Image(np.asarray(labels6.dataobj).astype(np.int16), labels6.affine)
    cases = [write_case(bids, truth_dir, s, labels6, len(lut)) for s in opts.seeds]
    write_bids_root(bids, cases)
    assets = load_assets(opts.assets_dir)
    section = assets.brainstem()
    dst, work = out / 'out-default', out / 'work'
    seconds = run_cerebseg(bids, dst, work, opts.assets_dir.resolve(),
                           ['--participant-label', *cases, '--skip-cerebellum'],
                           out / 'out-default.log')
    times = {'cerebseg --skip-cerebellum (whole run)': seconds}
    if 'network' in opts.methods:   # the same work folder: preprocessing reused
        extra = ['--brainstem-weights', str(opts.brainstem_weights.resolve())] \
            if opts.brainstem_weights else []
        times['cerebseg --brainstem-method network (same work folder)'] = run_cerebseg(
            bids, out / 'out-network', work, opts.assets_dir.resolve(),
            ['--participant-label', *cases, '--skip-cerebellum', '--brainstem-method',
             'network', *extra], out / 'out-network.log')
    results = {}
    for lab in cases:
        native = anat_file(dst, lab, f'space-T1w_{SEG}_dseg.nii.gz')
        if 'default' in opts.methods:
            results.setdefault('cerebseg (default)', {})[lab] = nib.load(native)
        if 'network' in opts.methods:
            results.setdefault('cerebseg --brainstem-method network', {})[lab] = nib.load(
                anat_file(out / 'out-network', lab, f'space-T1w_{SEG}_dseg.nii.gz'))
        if 'ants' in opts.methods:
            cached = out / 'ants' / f'sub-{lab}_space-T1w_{SEG}_dseg.nii.gz'
            if not cached.is_file():
                tic = time.perf_counter()
                wf = workdir.run_folder(work, f'sub-{lab}')
                img = ants_full(wf / workdir.BS_T1_BOX,
                                assets.path(section['t1w']), assets.path(section['dseg']))
                ref = nib.load(native)
                xfm = str(anat_file(dst, lab, 'from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm'
                                    '.mat'))
                if not Path(xfm).is_file():   # brainstem-only runs keep it in the work folder
                    xfm = str(next(wf.glob(workdir.BOX_AFFINE_GLOB)))
                cached.parent.mkdir(exist_ok=True)
                nib.save(nib.Nifti1Image(box_to_native(np.asarray(img.dataobj), img.affine, ref,
                                                       xfm), ref.affine), cached)
                key = 'ANTs SyN (registration only)'
                times[key] = times.get(key, 0.0) + time.perf_counter() - tic
            results.setdefault('ANTs SyN (antsRegistrationSyN defaults)', {})[lab] = \
                nib.load(cached)
    keys = ['whole_dice', 'midbrain_dice', 'pons_dice', 'medulla_dice', 'nuclei_dice',
            'volume_error_pct', 'part_volume_abs_error_pct', 'nuclei_volume_abs_error_pct',
            'hd95_mm']
    per_case = []
    for method, by_case in results.items():
        for lab, img in by_case.items():
            truth = nib.load(truth_dir / f'sub-{lab}_space-T1w_{SEG}_dseg.nii.gz')
            meta = json.loads((truth_dir / f'sub-{lab}_truth.json').read_text())
            s = score(np.asarray(img.dataobj), np.asarray(truth.dataobj),
                      np.asarray(meta['volumes_mm3']), lut, truth.header.get_zooms()[:3])
            per_case.append((method, lab, s))
    print(f'\nBrainstem, exact truth, native T1w grid, {len(cases)} case(s); mean (sd)\n')
    print_score_table(per_case, keys, [
        'whole Dice', 'midbrain Dice', 'pons Dice', 'medulla Dice', 'mean nucleus Dice',
        'total volume error %', 'mean abs part volume error %',
        'mean abs nucleus volume error %', 'HD95 mm'], times, len(cases), dice_digits=3)
    if opts.tsv:
        write_scores_tsv(opts.tsv, per_case, keys)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
