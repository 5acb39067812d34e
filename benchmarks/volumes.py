"""Real subjects: native-space volumes of cerebseg next to another setting and published ranges.

Runs the real ``cerebseg`` command (``--run NAME -- OPTIONS``, repeatable; skipped where the
outputs exist) on the participants of one BIDS dataset, then prints, per participant, the
total cerebellar volume (all labels), the left/right asymmetry index ``(L - R) / (L + R)`` of the
hemispheric labels and, between the first run and each other, the relative volume difference
and the whole-cerebellum Dice; and a summary next to the per-lobule volumes that DeepCeres,
CERES and ACAPULCO measured on the HNU test-retest data (``../shared/data/reference``):
plausibility ranges, not truth. The protocols differ: CERES-style lobules (I-V, VI, Crus I, Crus
II, VIIB, VIIIA, VIIIB, IX, X per side) include the vermis, SUIT keeps it apart; the sum compared
is the SUIT hemispheric and vermal labels of those lobules against the reference's two sides.

``--jlf RUN`` adds antsJointFusion (:func:`baselines.joint_fusion`: patch radius 2, search
radius 1, on the working grid) of the ANTs-warped library entries that the run ``RUN`` (one
with ``--registration ants``) left in its work folder, taken to the native grid through that
run's affine: the ANTs SyN + joint label fusion baseline a user could run instead.

Usage::

    python benchmarks/volumes.py --bids ../shared/data/bids/ds002748 --assets-dir .assets \\
        --out VOL --participant-label 01 02 03 --jlf ants --run default -- \\
        --run ants -- --registration ants --models none

(everything after ``--run NAME --`` up to the next ``--run`` is passed to cerebseg).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from common import run_cerebseg

from cerebseg.workflows import workdir

REFERENCE = Path(os.environ.get('CEREBSEG_SHARED_DATA', Path(__file__).resolve().parents[2]
                                / 'shared' / 'data')) / 'reference' / \
    'reliability_cerebellar_volumetry'
#: reference column stem -> SUIT label stems (hemispheric and vermal)
LOBULES = {'I.V': ('I_IV', 'V'), 'VI': ('VI',), 'Crus.I': ('CrusI',), 'Crus.II': ('CrusII',),
           'VIIB': ('VIIb',), 'VIIIA': ('VIIIa',), 'VIIIB': ('VIIIb',), 'IX': ('IX',),
           'X': ('X',)}


def split_runs(argv: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """``[... --run A -- opts --run B -- opts]`` -> (the other arguments, [(A, opts), ...])."""
    head, runs, i = [], [], 0
    while i < len(argv):
        if argv[i] == '--run':
            name, i = argv[i + 1], i + 2
            opts = []
            if i < len(argv) and argv[i] == '--':
                i += 1
                while i < len(argv) and argv[i] != '--run':
                    opts.append(argv[i])
                    i += 1
            runs.append((name, opts))
        else:
            head.append(argv[i])
            i += 1
    return head, runs


def read_morph(path: Path) -> dict:
    with open(path, newline='') as fobj:
        return {r['name']: float(r['volume_mm3']) / 1000 for r in csv.DictReader(
            fobj, delimiter='\t')}


def lobule_sum(vols: dict) -> float:
    names = {f'{side}_{stem}' for stems in LOBULES.values() for stem in stems
             for side in ('Left', 'Right', 'Vermis')}
    return sum(v for k, v in vols.items() if k in names)


def asymmetry(vols: dict) -> float:
    left = sum(v for k, v in vols.items() if k.startswith('Left_'))
    right = sum(v for k, v in vols.items() if k.startswith('Right_'))
    return (left - right) / (left + right)


def reference_sums() -> dict:
    out = {}
    for method in ('deepCeres', 'ceres', 'acapulco'):
        path = REFERENCE / f'all_volumes_cm3_{method}.csv'
        if not path.is_file():
            continue
        with open(path, newline='') as fobj:
            rows = list(csv.DictReader(fobj))
        cols = [f'{side}.{stem}' for stem in LOBULES for side in ('Left', 'Right')]
        sums = np.array([sum(float(r[c]) for c in cols) for r in rows])
        # the ACAPULCO table is in mm^3 despite its name (lobule sums of about 1e5)
        out[method] = sums / 1000 if np.median(sums) > 1000 else sums
    return out


LUT = 'seg-cerebellum_dseg.tsv'


def label_volumes(path: Path, lut: Path) -> dict:
    """name -> volume (mL) of a label map, names from a BIDS ``dseg.tsv``."""
    from cerebseg.utils import native

    img = nib.load(path)
    rows = [r for r in native.read_lut_tsv(lut) if r['index']]
    vols = native.label_volumes(np.asarray(img.dataobj), img.header.get_zooms()[:3],
                                max(r['index'] for r in rows) + 1)
    return {r['name']: vols[r['index']] / 1000 for r in rows}


def jlf_native(out: Path, run: str, label: str) -> Path | None:
    """antsJointFusion of run ``run``'s ANTs-warped entries for one participant, on its native
    grid (cached); None when that run did not finish for the participant."""
    from accuracy import box_to_native
    from baselines import joint_fusion

    cached = out / f'jlf-{run}' / f'sub-{label}_space-T1w_seg-cerebellum_dseg.nii.gz'
    anat = out / run / f'sub-{label}' / 'anat'
    native = anat / f'sub-{label}_space-T1w_seg-cerebellum_dseg.nii.gz'
    if cached.is_file():
        return cached
    if not native.is_file():
        return None
    wf = workdir.run_folder(out / f'work-{run}', f'sub-{label}')
    reg_dir = wf / workdir.REGISTER_DIR
    n_entries = len(list((reg_dir / 'mapflow').glob('_register*')))
    fused, aff = joint_fusion(reg_dir, wf / workdir.T1_BOX, n_entries)
    ref = nib.load(native)
    xfm = str(anat / f'sub-{label}_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.mat')
    cached.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(box_to_native(fused, aff, ref, xfm), ref.affine), cached)
    return cached


def main(argv=None) -> int:
    head, runs = split_runs(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--bids', type=Path, required=True)
    parser.add_argument('--assets-dir', type=Path, required=True)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--participant-label', nargs='+', required=True)
    parser.add_argument('--jlf', metavar='RUN', default=None,
                        help='add antsJointFusion of the ANTs-warped entries of run RUN')
    opts = parser.parse_args(head)
    if not runs:
        parser.error('give at least one --run NAME [-- cerebseg options]')
    from cerebseg.utils.evaluation import whole_dice

    labels = [p.removeprefix('sub-') for p in opts.participant_label]
    for name, extra in runs:
        dst = opts.out / name
        todo = [p for p in labels if not (dst / f'sub-{p}' / 'anat' /
                                          f'sub-{p}_seg-cerebellum_morph.tsv').is_file()]
        if not todo:
            continue
        try:
            run_cerebseg(opts.bids, dst, opts.out / f'work-{name}', opts.assets_dir,
                         ['--participant-label', *todo, *extra], opts.out / f'{name}.log')
        except RuntimeError as err:   # failed participants are reported in the table
            print(f'{name}: {err}', file=sys.stderr)
    names = [n for n, _ in runs]
    if opts.jlf:
        if opts.jlf not in names:
            parser.error(f'--jlf {opts.jlf}: no such --run')
        names.append('jlf')
    first = names[0]
    head_cells = ['participant'] + [f'{n} total mL' for n in names] + \
        [f'{n} asymmetry' for n in names] + \
        [f'{n} vs {first}: volume %, Dice' for n in names[1:]]
    print('| ' + ' | '.join(head_cells) + ' |')
    print('|---' * len(head_cells) + '|')
    totals = {n: [] for n in names}
    sums = {n: [] for n in names}
    for p in labels:
        morph, dseg = {}, {}
        for n in names:
            if n == 'jlf':
                dseg[n] = jlf_native(opts.out, opts.jlf, p)
                morph[n] = None if dseg[n] is None else label_volumes(
                    dseg[n], opts.out / opts.jlf / LUT)
                continue
            anat = opts.out / n / f'sub-{p}' / 'anat'
            path = anat / f'sub-{p}_seg-cerebellum_morph.tsv'
            morph[n] = read_morph(path) if path.is_file() else None
            dseg[n] = anat / f'sub-{p}_space-T1w_seg-cerebellum_dseg.nii.gz'
        if any(m is None for m in morph.values()):
            print(f'| sub-{p} | failed: see {opts.out}/*.log |')
            continue
        cells = [f'sub-{p}']
        for n in names:
            totals[n].append(sum(morph[n].values()))
            sums[n].append(lobule_sum(morph[n]))
            cells.append(f'{totals[n][-1]:.1f}')
        cells += [f'{asymmetry(morph[n]):+.3f}' for n in names]
        ref = np.asarray(nib.load(dseg[first]).dataobj)
        for n in names[1:]:
            other = np.asarray(nib.load(dseg[n]).dataobj)
            cells.append(f'{(totals[n][-1] / totals[first][-1] - 1) * 100:+.1f}, '
                         f'{whole_dice(other, ref):.3f}')
        print('| ' + ' | '.join(cells) + ' |', flush=True)
    print('\nSum of lobules I-X, both sides (mL): mean (sd) [min, max]')
    for n in names:
        v = np.asarray(sums[n])
        if len(v):
            print(f'- cerebseg {n} ({len(v)} participants): {v.mean():.1f} ({v.std():.1f}) '
                  f'[{v.min():.1f}, {v.max():.1f}]')
    for method, v in reference_sums().items():
        print(f'- {method}, HNU ({len(v)} sessions): {v.mean():.1f} ({v.std():.1f}) '
              f'[{v.min():.1f}, {v.max():.1f}]')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
