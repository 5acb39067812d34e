"""A cerebellum or brainstem cut off by the edge of the image: is it flagged, and how much is
said to be missing?

Usage::

    python benchmarks/field_of_view.py --assets-dir ASSETS --out BENCH/fov \\
        --t1w ../shared/data/bids/ds002748/sub-03/anat/sub-03_T1w.nii.gz \\
        [--below 5 10 20 40] [--behind 5 10 20 40] [-- cerebseg options]

The real command runs on the whole image, then on crops of it (the input's voxels, header
shifted: what a scanner with a smaller field of view or a cropping tool gives): ``--below MM``
removes the slab that holds the lowest MM of the whole run's cerebellum (the image axis nearest
to inferior-superior), ``--behind MM`` the slab with its rearmost MM (nearest to
posterior-anterior). The share of each structure removed is counted on the whole run's native
labels (cerebseg's own labels of the whole image: the reference, not exact truth). Per crop:
that share, the share the crop's sidecar says lies outside the image (``FieldOfView``), whether
the ``field_of_view`` flag was raised, how many labels were written n/a, and the total of the
labels still measured. Re-running with the same ``--out`` reuses the runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_cerebseg, split_options  # noqa: E402

SEGS = ('cerebellum', 'brainstem')


def _bids(root: Path, label: str, img: nib.Nifti1Image) -> Path:
    anat = root / f'sub-{label}' / 'anat'
    anat.mkdir(parents=True, exist_ok=True)
    (root / 'dataset_description.json').write_text(json.dumps(
        {'Name': 'cerebseg field-of-view benchmark', 'BIDSVersion': '1.10.0'}))
    path = anat / f'sub-{label}_T1w.nii.gz'
    if not path.exists():
        nib.save(img, path)
    return path


def _axis(affine: np.ndarray, world: int) -> tuple[int, int]:
    """The voxel axis nearest to world axis ``world`` (RAS) and its sign (+1: the index grows
    towards +world)."""
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    axis = int(np.argmax(np.abs(cols[world])))
    return axis, int(np.sign(cols[world, axis]))


def crop(img: nib.Nifti1Image, labels: np.ndarray, world: int, mm: float
         ) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The image without the slab holding the lowest ``mm`` of ``labels`` along world axis
    ``world`` (towards -world: inferior for 2, posterior for 1); returns the crop and the mask
    of the removed voxels on the whole grid."""
    axis, sign = _axis(img.affine, world)
    size = float(np.linalg.norm(img.affine[:3, axis]))
    present = np.nonzero(np.moveaxis(labels > 0, axis, 0).reshape(labels.shape[axis], -1)
                         .any(1))[0]
    steps = int(round(mm / size))
    removed = np.zeros(img.shape[:3], bool)
    index = [slice(None)] * 3
    if sign > 0:   # the lowest indices are the lowest along the world axis
        cut = present.min() + steps
        index[axis] = slice(cut, None)
        removed[tuple(slice(0, cut) if i == axis else slice(None) for i in range(3))] = True
    else:
        cut = present.max() + 1 - steps
        index[axis] = slice(0, cut)
        removed[tuple(slice(cut, None) if i == axis else slice(None) for i in range(3))] = True
    return img.slicer[tuple(index)], removed


def _done(out: Path, label: str) -> bool:
    """Whether a run finished (an interrupted one leaves some outputs: run it again)."""
    return all((out / f'sub-{label}' / 'anat' / f'sub-{label}_seg-{seg}_morph.tsv').is_file()
               for seg in SEGS)


def _results(out: Path, label: str) -> dict:
    anat = out / f'sub-{label}' / 'anat'
    res = {}
    for seg in SEGS:
        meta = json.loads((anat / f'sub-{label}_space-T1w_seg-{seg}_dseg.json').read_text())
        rows = [line.split('\t') for line in
                (anat / f'sub-{label}_seg-{seg}_morph.tsv').read_text().splitlines()[1:]]
        measured = [float(r[2]) for r in rows if r[0] != 'n/a' and r[2] != 'n/a']
        res[seg] = {'fov': meta.get('FieldOfView', {}),
                    'missing': sum(1 for r in rows if r[0] != 'n/a' and r[2] == 'n/a'),
                    'measured_ml': sum(measured) / 1000.0}
    status = sorted((out / f'sub-{label}' / 'log').glob(f'*/sub-{label}_status.json'))
    flags = json.loads(status[-1].read_text()).get('qc_flags', []) if status else []
    for seg in SEGS:
        res[seg]['flagged'] = any(f['kind'] == 'field_of_view' and f['structure'] == seg
                                  for f in flags)
    return res


def main(argv=None) -> int:
    own, extra = split_options(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--assets-dir', required=True, type=Path)
    parser.add_argument('--t1w', required=True, type=Path)
    parser.add_argument('--out', required=True, type=Path)
    parser.add_argument('--below', type=float, nargs='*', default=[5, 10, 20, 40])
    parser.add_argument('--behind', type=float, nargs='*', default=[5, 10, 20, 40])
    opts = parser.parse_args(own)
    bids, out, work = opts.out / 'bids', opts.out / 'out', opts.out / 'work'
    img = nib.load(opts.t1w)
    _bids(bids, 'whole', img)
    if not _done(out, 'whole'):
        run_cerebseg(bids, out, work, opts.assets_dir, ['--participant-label', 'whole', *extra],
                     opts.out / 'logs' / 'whole.log')
    anat = out / 'sub-whole' / 'anat'
    whole = {seg: np.asarray(nib.load(anat / f'sub-whole_space-T1w_seg-{seg}_dseg.nii.gz')
                             .dataobj) for seg in SEGS}
    ref = _results(out, 'whole')
    print(f'\n## {opts.t1w}: whole image, cerebellum {ref["cerebellum"]["measured_ml"]:.1f} mL, '
          f'brainstem {ref["brainstem"]["measured_ml"]:.1f} mL, flags: '
          f'{[s for s in SEGS if ref[s]["flagged"]] or "none"}\n')
    print('| crop | cerebellum removed % | said outside % | flagged | labels n/a | measured mL '
          '| brainstem removed % | said outside % | flagged | labels n/a |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for side, world, sizes in (('below', 2, opts.below), ('behind', 1, opts.behind)):
        for mm in sizes:
            label = f'{side}{int(round(mm))}'
            cut, removed = crop(img, whole['cerebellum'], world, mm)
            _bids(bids, label, cut)
            if not _done(out, label):
                run_cerebseg(bids, out, work, opts.assets_dir,
                             ['--participant-label', label, *extra],
                             opts.out / 'logs' / f'{label}.log')
            res = _results(out, label)
            cells = []
            for seg in SEGS:
                share = (whole[seg][removed] > 0).sum() / max((whole[seg] > 0).sum(), 1)
                said = res[seg]['fov'].get('WholeShareOutside', float('nan'))
                cells += [f'{100 * share:.1f}', f'{100 * said:.1f}',
                          'yes' if res[seg]['flagged'] else 'no', str(res[seg]['missing'])]
                if seg == 'cerebellum':
                    cells.append(f'{res[seg]["measured_ml"]:.1f}')
            print(f'| {side} {mm:g} mm | ' + ' | '.join(cells) + ' |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
