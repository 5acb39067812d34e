"""Whole head vs skull-stripped: the same subject must get the same volumes (within 3 %).

The whole-head T1w goes through the real ``cerebseg`` command; its brain mask is the
MNI152NLin2009cAsym brain mask of the assets brought back to native space by the run's own
affine (dilated by ``--dilate-mm``, 6 mm by default: the affine-only mask is tight around the
cerebellum); the masked image goes through the command again. Printed: total and per-label
volumes of both runs, their differences, the share of the whole-head labels that the mask cuts
off, and the whole-cerebellum Dice.

Usage::

    python benchmarks/skullstrip.py --assets-dir .assets --out STRIP \\
        --t1w ../shared/data/bids/multimodal/sub-chris/anat/sub-chris_T1w.nii.gz -- --models none
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from common import run_cerebseg, split_options


def main(argv=None) -> int:
    argv, extra = split_options(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--assets-dir', type=Path, required=True)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--t1w', type=Path, required=True)
    parser.add_argument('--dilate-mm', type=float, default=6.0)
    opts = parser.parse_args(argv)
    import ants
    from scipy import ndimage

    from cerebseg.assets.locate import load_assets
    from cerebseg.utils.evaluation import whole_dice
    from cerebseg.utils.images import nib_to_ants
    from cerebseg.utils.native import read_lut_tsv

    out = opts.out.resolve()
    img = nib.load(opts.t1w)
    results, masks = {}, {}
    for tag in ('head', 'brain'):
        bids = out / f'bids-{tag}'
        anat = bids / 'sub-s' / 'anat'
        anat.mkdir(parents=True, exist_ok=True)
        (bids / 'dataset_description.json').write_text(json.dumps(
            {'Name': f'skull-strip check ({tag})', 'BIDSVersion': '1.10.0'}))
        data = np.asarray(img.dataobj)
        if tag == 'brain':
            xfm = results['head'] / 'sub-s/anat/sub-s_from-T1w_to-MNI152NLin2009cAsym_' \
                                    'mode-image_xfm.mat'
            assets = load_assets(opts.assets_dir, verify=False)
            mask_mni = nib.load(assets.path(assets.manifest['templates']['mask']))
            mask = ants.apply_transforms(nib_to_ants(img), nib_to_ants(mask_mni), [str(xfm)],
                                         whichtoinvert=[True], interpolator='nearestNeighbor')
            zooms = img.header.get_zooms()[:3]
            struct = ndimage.generate_binary_structure(3, 1)
            mask = ndimage.binary_dilation(mask.numpy() > 0.5, struct,
                                           iterations=max(int(opts.dilate_mm / min(zooms)), 0))
            data = np.where(mask, data, 0).astype(data.dtype)
            masks[tag] = mask
        nib.save(nib.Nifti1Image(data, img.affine, img.header), anat / 'sub-s_T1w.nii.gz')
        results[tag] = out / f'out-{tag}'
        run_cerebseg(bids, results[tag], out / f'work-{tag}', opts.assets_dir, extra,
                     out / f'out-{tag}.log')
    lut = read_lut_tsv(results['head'] / 'seg-cerebellum_dseg.tsv')
    maps = {t: nib.load(p / 'sub-s/anat/sub-s_space-T1w_seg-cerebellum_dseg.nii.gz')
            for t, p in results.items()}
    voxel = float(np.prod(img.header.get_zooms()[:3])) / 1000
    arrays = {t: np.asarray(m.dataobj) for t, m in maps.items()}
    print(f'options: {" ".join(extra) or "(defaults)"}; mask dilated {opts.dilate_mm} mm\n')
    print('| structure | whole head mL | skull-stripped mL | difference % |')
    print('|---|---|---|---|')
    rows = [('Whole cerebellum', [(a > 0).sum() * voxel for a in arrays.values()])]
    rows += [(r['name'], [(a == r['index']).sum() * voxel for a in arrays.values()])
             for r in lut if r['index']]
    for name, (head, brain) in rows:
        diff = (brain / head - 1) * 100 if head else float('nan')
        print(f'| {name} | {head:.2f} | {brain:.2f} | {diff:+.1f} |')
    outside = ((arrays['head'] > 0) & ~masks['brain']).sum() / max((arrays['head'] > 0).sum(), 1)
    print(f'\nWhole-head labels outside the brain mask: {100 * outside:.2f} % (the mask must '
          'keep the cerebellum whole for the comparison to mean anything)')
    print(f'Whole-cerebellum Dice between the two: '
          f'{whole_dice(arrays["head"], arrays["brain"]):.4f}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
