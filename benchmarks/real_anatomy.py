"""End-to-end accuracy on real individual anatomy: the CoBrALab manual lobule maps, leave one map
out.

Truth: the three public manual maps of Park et al. 2014 (``brain1``-``brain3``, 0.3 mm, CERES
protocol, in ``../shared/data/atlases/cerebellum/CoBrALab-manual``). Their images are not public,
so each case's images are synthesised from its labels (:mod:`cerebseg.assets.manual`,
:mod:`cerebseg.utils.synthesis`): the map is put into MNI152NLin2009cAsym's posterior fossa (the
template bent around it), its cerebellum painted per tissue with random levels (grey matter,
white-matter cores deeper than a random cortical thickness of 0.8-1.3 mm, corpus medullare, CSF
in the sulci and fissures the labels leave unlabelled and a random share of the fissures they
do not), scaled back to the map's own size, then put through a seeded random affine and a smooth
displacement, sampled with 27 sub-samples per voxel on an anisotropic reoriented native grid,
with bias, contrast change and Rician noise (:func:`cerebseg.utils.truth.make_case`). The truth
is the map on that grid (majority of sub-samples; exact partial-volume volumes).

Libraries (``--atlas-library cobra`` unless said), per fold, the case's own map and its mirror
always left out:

* ``template``: MNI152NLin2009cAsym with the CoBra atlas and its mirror (today's CERES library);
* ``manual``: that plus the other two manual maps and their mirrors (real anatomy);
* ``maps``: the other two manual maps and their mirrors only, without the CoBra atlas;
* ``suit``: the SUIT library (``--atlas-library suit``, the default until this benchmark chose
  cobra; scored on the lobule groups only).

The CoBra atlas is the maximum-probability map of the five CoBrALab manual maps (CAT12's
``CoBra.txt``), brain1-brain3 among them: every library that holds it has seen 1/5 of the case's
own map, so the ``template`` and ``manual`` rows are optimistic. ``maps`` (and ``maps-search``)
is the only library here that has not seen the case's map in any form.

Methods (rows): the real ``cerebseg`` command with each library; ``template-search``,
``manual-search`` and ``maps-search``: the same runs with ``--fusion-search 1`` (non-local
voting only), ``manual-local`` and ``maps-local`` with ``--fusion-search 0`` (local voting
only; the cobra default mixes the two), same work folder, so only the fusion and what follows
run again; antsJointFusion
(patch radius 2, search radius 1) of the ANTs-registered entries of the ``manual`` library
(``--registration ants`` run of the same library), as in ``accuracy.py``; ``jlf-maps``: the
same registrations, the CoBra entries left out of the fusion. ``manual-cnn``, ``maps-cnn``
(``manual-search-cnn``): those runs with the lobule networks of ``--cnn-weights`` on their prior
(``--models``; networks trained by ``scripts/train_ceres.py``, refused on a map they saw).

Scores on the native T1w grid: mean Dice over the 24 CERES lobules; mean Dice over the 10
lobule groups with sides and vermis merged (I-IV, V, VI, Crus I, Crus II, VIIB, VIIIA, VIIIB, IX,
X; both protocols can be scored there); whole cerebellum Dice (the corpus medullare included);
signed total volume error; mean absolute volume error of the 24 lobules and of the 10 groups;
HD95 of the whole cerebellum.

Usage::

    python benchmarks/real_anatomy.py --assets-dir ASSETS --out BENCH/real \\
        [--maps 1 2 3] [--seeds 1] [--methods template manual suit jlf template-search
        manual-search maps maps-search jlf-maps] [--t2w] [--outline fused|trimmed]
        [--lobule-borders fused] [--overlays DIR]

``--recede MM`` makes the same cases atrophied (:func:`cerebseg.utils.synthesis.recede`: the
surface and the fissures' banks receding by MM, CSF in their place; labelled
``brain<k><tag><seed>r<MM x 100>``; everything else drawn as without it): their volume error
beside the intact case's gives the share of the loss a method measures.

``--t2w`` makes each case with a T2w as well (labelled ``brain<k>m<seed>``; its T1w is that of
``brain<k>s<seed>``; the T2w painted with T2w levels over the template head remapped to a T2w
contrast, :func:`cerebseg.assets.manual.t2w_head`, on its own grid) and runs cerebseg on both.
Only the SUIT library has a T2w (its MNI152NLin6AsymC entry and that entry's mirror): the CERES
library's entries have none, so the fusion of a cobra run has no second channel to use.

``ASSETS`` must hold the ``cobra`` library with its manual entries (``cerebseg-assets build
--library suit --library cobra``). Re-running with the same ``--out`` reuses the placed maps,
the cases and the cerebseg work folders. ``--outline fused`` scores the cerebseg rows with the
outline as the fusion draws it (before the T1w trims and grows it; ``cerebseg --outline``),
``--outline trimmed`` with the outline trimmed only.
The cobra rows run with cerebseg's default lobule borders (moved onto the white-matter
branches); ``--lobule-borders fused`` runs them with the borders as fused, ``branches`` names
the default in the rows and folders (``cerebseg --lobule-borders``; the suit row is left as it
is).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from accuracy import anat_file, box_to_native, case_folders, hd95, overlay, save_case
from baselines import joint_fusion
from common import print_score_table, run_cerebseg, write_scores_tsv

from cerebseg.assets.build import entry_labels, leave_out_entry
from cerebseg.workflows import workdir

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('CEREBSEG_SHARED_DATA', REPO.parent / 'shared' / 'data'))
MAP = 'atlases/cerebellum/CoBrALab-manual/cerebellum/labels/brain{}_labels.mnc'
TEMPLATE = 'templates/MNI152NLin2009cAsym/MNI152_2009_template.nii.gz'
TEMPLATE_ENTRY = 'MNI152NLin2009cAsym'
N_LABELS = 27                      # CERES: background, 12 lobules + CM per side
LOBULES = [*range(1, 13), *range(14, 26)]
GROUPS = ['I-IV', 'V', 'VI', 'Crus I', 'Crus II', 'VIIB', 'VIIIA', 'VIIIB', 'IX', 'X']
#: CERES index -> group (the 12 lobules of each side; the corpus medullare has none)
CERES_GROUP = {i + off: g for off in (0, 13) for i, g in
               zip(range(1, 13), [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])}
_SUIT_STEMS = {'I_IV': 0, 'V': 1, 'VI': 2, 'CrusI': 3, 'CrusII': 4, 'VIIb': 5, 'VIIIa': 6,
               'VIIIb': 7, 'IX': 8, 'X': 9}


def entry_name(k: int) -> str:
    return f'CoBrALab-brain{k}'


def placed_map(k: int, cache: Path):
    """Map ``k`` put into the template (:func:`cerebseg.assets.manual.place_in_template`),
    cached in ``cache``."""
    from cerebseg.assets.manual import Placed, place_in_template, read_manual_map

    files = {n: cache / f'brain{k}_{n}.nii.gz' for n in ('head', 'labels', 'tplcereb')}
    meta_file = cache / f'brain{k}_placed.json'
    if not meta_file.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        placed = place_in_template(read_manual_map(SHARED / MAP.format(k)),
                                   nib.load(SHARED / TEMPLATE),
                                   entry_labels(SHARED, 'cobra', TEMPLATE_ENTRY))
        nib.save(placed.head, files['head'])
        nib.save(placed.labels, files['labels'])
        nib.save(nib.Nifti1Image(placed.template_cerebellum.astype(np.uint8),
                                 placed.labels.affine), files['tplcereb'])
        meta_file.write_text(json.dumps({'similarity': placed.similarity,
                                         'scale': placed.scale}))
    meta = json.loads(meta_file.read_text())
    return Placed(head=nib.load(files['head']), labels=nib.load(files['labels']),
                  template_cerebellum=np.asarray(nib.load(files['tplcereb']).dataobj) > 0,
                  similarity=meta['similarity'], scale=meta['scale'])


def networks_saw(manifest: Path) -> set[int]:
    """The maps (1-3) whose cases trained or validated the lobule networks of a weights
    manifest (from the checkpoints' training metadata: labels ``brain<k>...``)."""
    from cerebseg.models.checkpoint import read_cascade_checkpoint

    spec = json.loads(manifest.read_text())
    seen = set()
    for variant in spec['variants'].values():
        for entry in variant['lobules']:
            training = read_cascade_checkpoint(manifest.parent / entry['file'])['training'] or {}
            for label in training.get('train', []) + training.get('validation', []):
                label = label.removeprefix('sub-')
                if label.startswith('brain') and label[5:6].isdigit():
                    seen.add(int(label[5]))
    return seen


def write_case(bids: Path, truth_dir: Path, cache: Path, k: int, seed: int, *,
               tag: str = 's', supersample: int = 3, t2w: bool = False,
               recede_mm: float = 0.0) -> str:
    """One synthesised case of map ``k`` (skipped when written), labelled
    ``brain<k><tag><seed>`` (``r<recede_mm in hundredths>`` appended for an atrophied one),
    painted with ``supersample``^3 sub-samples per voxel, with a T2w when ``t2w``; returns its
    label."""
    from cerebseg.assets.manual import manual_case

    label = f'brain{k}{tag}{seed}' + (f'r{round(100 * recede_mm)}' if recede_mm > 0 else '')
    todo = case_folders(bids, truth_dir, label)
    if todo is None:
        return label
    anat, truth_file = todo
    placed = placed_map(k, cache)
    case, drawn = manual_case(placed, seed=1000 * k + seed, supersample=supersample, t2w=t2w,
                              recede_mm=recede_mm)
    save_case(case, anat, truth_dir, label, truth_file, map=MAP.format(k), **drawn)
    return label


def write_bids_root(bids: Path, labels: list[str]) -> None:
    bids.mkdir(parents=True, exist_ok=True)
    (bids / 'dataset_description.json').write_text(json.dumps(
        {'Name': 'cerebseg real-anatomy cases (CoBrALab manual maps, synthesised images)',
         'BIDSVersion': '1.10.0'}))
    # every case written so far (T1w-only and T1w+T2w cases share the folder)
    every = sorted({*labels, *(p.name[4:] for p in bids.glob('sub-*') if p.is_dir())})
    (bids / 'participants.tsv').write_text('participant_id\n' + ''.join(
        f'sub-{lab}\n' for lab in every))


def group_table(lut_rows: list[tuple[int, str]]) -> dict[int, int]:
    """Output label index -> lobule group, from the output's lookup table (CERES or SUIT
    names)."""
    names = dict(lut_rows)
    if any('Cerebellar Lobule' in n or 'Cerebellar_Lobule' in n for n in names.values()):
        return dict(CERES_GROUP)
    out = {}
    for index, name in names.items():
        stem = name.split('_', 1)[1] if '_' in name else name
        if stem in _SUIT_STEMS:
            out[index] = _SUIT_STEMS[stem]
    return out


def to_groups(labels: np.ndarray, table: dict[int, int]) -> np.ndarray:
    lut = np.zeros(max(int(labels.max(initial=0)), max(table)) + 1, np.int16)
    for index, group in table.items():
        lut[index] = group + 1
    return lut[labels.astype(np.int64)]


def score(pred: np.ndarray, truth: np.ndarray, truth_vol: np.ndarray, zooms,
          pred_groups: dict[int, int], ceres: bool) -> dict:
    from cerebseg.utils.evaluation import dice_per_label, whole_dice

    voxel = float(np.prod(zooms))
    truth_groups = to_groups(truth, CERES_GROUP)
    groups = to_groups(pred, pred_groups)
    g_truth_vol = np.zeros(len(GROUPS) + 1)
    for index, group in CERES_GROUP.items():
        g_truth_vol[group + 1] += truth_vol[index]
    g_vol = np.bincount(groups.ravel(), minlength=len(GROUPS) + 1)[:len(GROUPS) + 1] * voxel
    out = {'group_dice': float(np.nanmean(dice_per_label(groups, truth_groups,
                                                         range(1, len(GROUPS) + 1)))),
           'whole_dice': whole_dice(pred, truth),
           'volume_error_pct': float(((pred > 0).sum() * voxel / truth_vol[1:].sum() - 1) * 100),
           'group_volume_abs_error_pct': float(np.mean(np.abs(g_vol[1:] / g_truth_vol[1:] - 1))
                                               * 100),
           'hd95_mm': hd95(pred > 0, truth > 0, zooms),
           'volume_ml': float((pred > 0).sum() * voxel / 1000)}
    if ceres:
        dice = dice_per_label(pred, truth, LOBULES)
        vols = np.bincount(pred.ravel().astype(np.int64), minlength=N_LABELS)[:N_LABELS] * voxel
        out['lobule_dice'] = float(np.nanmean(dice))
        out['lobule_volume_abs_error_pct'] = float(np.mean(np.abs(
            vols[LOBULES] / truth_vol[LOBULES] - 1)) * 100)
        out['per_lobule_dice'] = dice.round(4).tolist()
    else:
        out['lobule_dice'] = out['lobule_volume_abs_error_pct'] = float('nan')
    return out


def lobule_overlay(path: Path, image: np.ndarray, pred: np.ndarray, truth: np.ndarray,
                   title: str) -> None:
    """Three planes through the truth's centre: the image, the truth's lobule boundaries
    (green) and the method's (red). Boundaries belong on the fissures."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from scipy import ndimage

    def edges(lab):
        return ndimage.morphological_gradient(lab.astype(np.int16), size=2) > 0

    centre = [int(c) for c in np.argwhere(truth > 0).mean(0)]
    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    for axis, ax in enumerate(axes):
        sl = [slice(None)] * 3
        sl[axis] = centre[axis]
        sl = tuple(sl)
        box = np.argwhere(truth[sl] > 0)
        lo, hi = box.min(0) - 8, box.max(0) + 8
        crop = (slice(max(lo[0], 0), hi[0]), slice(max(lo[1], 0), hi[1]))
        ax.imshow(image[sl][crop].T, origin='lower', cmap='gray', interpolation='nearest')
        for lab, cmap in ((truth, 'summer'), (pred, 'autumn')):
            e = edges(lab[sl][crop]).T
            ax.imshow(np.ma.masked_where(~e, e), origin='lower', cmap=cmap, alpha=0.7,
                      interpolation='nearest')
        ax.set_axis_off()
    fig.suptitle(title + '  (green: truth boundaries, red: this method)')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def read_lut_rows(path: Path) -> list[tuple[int, str]]:
    from cerebseg.utils.native import read_lut_tsv

    return [(int(r['index']), r['name']) for r in read_lut_tsv(path)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--assets-dir', type=Path, required=True)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--maps', type=int, nargs='+', default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument('--seeds', type=int, nargs='+', default=[1])
    parser.add_argument('--methods', nargs='+', default=['template', 'manual', 'suit', 'jlf',
                                                         'template-search', 'manual-search',
                                                         'maps', 'maps-search'],
                        choices=['template', 'manual', 'suit', 'jlf', 'template-search',
                                 'manual-search', 'maps', 'maps-search', 'jlf-maps',
                                 'manual-local', 'maps-local', 'manual-cnn', 'maps-cnn',
                                 'manual-search-cnn'])
    parser.add_argument('--cnn-weights', type=Path, default=None,
                        help='manifest of CERES-protocol networks for the -cnn methods '
                             '(scripts/train_ceres.py; the case\'s map unseen by them)')
    parser.add_argument('--models', default='unet', choices=['unet', 'dpn', 'ensemble'],
                        help='the lobule networks of the -cnn methods')
    parser.add_argument('--tsv', type=Path, default=None)
    parser.add_argument('--overlays', type=Path, default=None)
    parser.add_argument('--t2w', action='store_true',
                        help='cases with a T2w as well (labelled brain<k>m<seed>: the same T1w '
                             'as brain<k>s<seed>), run without --t1-only')
    parser.add_argument('--recede', type=float, default=0.0, metavar='MM',
                        help='atrophied cases: the same cases with the cerebellar surface and '
                             'the fissures\' banks receded by MM (labelled ...r<MM x 100>; '
                             'everything else drawn as without it)')
    parser.add_argument('--outline', choices=['auto', 'tissue', 'trimmed', 'fused'],
                        default='auto',
                        help='cerebseg --outline of every cerebseg run (not auto: the method '
                             'names and output folders say it; the work folders are shared)')
    parser.add_argument('--affine-fit', choices=['symmetric', 'single'], default='symmetric',
                        help='cerebseg --affine-fit of every cerebseg run (single: the method '
                             'names, output and work folders say it)')
    parser.add_argument('--lobule-borders', choices=['auto', 'branches', 'fused'],
                        default='auto',
                        help='cerebseg --lobule-borders of the cerebseg runs of the cobra '
                             'library (not auto: the method names and output folders say it)')
    opts = parser.parse_args(argv)
    os.environ.setdefault('NIPYPE_NO_ET', '1')
    out = opts.out.resolve()
    bids, truth_dir, cache = out / 'bids', out / 'truth', out / 'anatomy'
    assets = opts.assets_dir.resolve()
    lib = json.loads((assets / 'manifest.json').read_text())['libraries'].get('cobra')
    manual = [entry_name(k) for k in (1, 2, 3)]
    if lib is None or not set(manual) <= {e['name'] for e in lib['entries']}:
        parser.error(f'{assets}: no cobra library with the manual entries {manual}; build it '
                     'with cerebseg-assets build --library suit --library cobra')
    folds = {}
    for k in opts.maps:
        for seed in opts.seeds:
            tic = time.perf_counter()
            folds.setdefault(k, []).append(write_case(bids, truth_dir, cache, k, seed,
                                                      tag='m' if opts.t2w else 's',
                                                      t2w=opts.t2w, recede_mm=opts.recede))
            print(f'case sub-{folds[k][-1]}: {time.perf_counter() - tic:.0f} s', flush=True)
    labels = [lab for k in folds for lab in folds[k]]
    write_bids_root(bids, labels)

    template_only = leave_out_entry(assets, out / 'assets-template', manual)
    runs = {'template': ('cerebseg --atlas-library cobra, template library (CoBra)',
                         ['--atlas-library', 'cobra']),
            'manual': ('cerebseg --atlas-library cobra, template + other manual maps',
                       ['--atlas-library', 'cobra']),
            'suit': ('cerebseg --atlas-library suit (SUIT library)', ['--atlas-library', 'suit']),
            'jlf': ('ANTs SyN + antsJointFusion, template + other manual maps',
                    ['--atlas-library', 'cobra', '--registration', 'ants']),
            'template-search': ('cerebseg --atlas-library cobra --fusion-search 1, template '
                                'library (CoBra)', ['--atlas-library', 'cobra',
                                                    '--fusion-search', '1']),
            'manual-search': ('cerebseg --atlas-library cobra --fusion-search 1, template + '
                              'other manual maps', ['--atlas-library', 'cobra',
                                                    '--fusion-search', '1']),
            'jlf-maps': ('ANTs SyN + antsJointFusion, other manual maps only (no CoBra)',
                         ['--atlas-library', 'cobra', '--registration', 'ants']),
            'maps': ('cerebseg --atlas-library cobra, other manual maps only (no CoBra)',
                     ['--atlas-library', 'cobra']),
            'maps-search': ('cerebseg --atlas-library cobra --fusion-search 1, other manual maps '
                            'only (no CoBra)', ['--atlas-library', 'cobra',
                                                '--fusion-search', '1']),
            'manual-local': ('cerebseg --atlas-library cobra --fusion-search 0, template + '
                             'other manual maps', ['--atlas-library', 'cobra',
                                                   '--fusion-search', '0']),
            'maps-local': ('cerebseg --atlas-library cobra --fusion-search 0, other manual maps '
                           'only (no CoBra)', ['--atlas-library', 'cobra',
                                               '--fusion-search', '0'])}
    cnn_methods = [m for m in opts.methods if m.endswith('-cnn')]
    if cnn_methods:
        if opts.cnn_weights is None:
            parser.error(f'{", ".join(cnn_methods)} need --cnn-weights')
        for key in cnn_methods:   # the run without networks, then the networks on its prior
            name, extra = runs[key.removesuffix('-cnn')]
            runs[key] = (f'{name}, --models {opts.models} ({opts.cnn_weights.parent.name})',
                         [*extra, '--models', opts.models,
                          '--cnn-weights', str(opts.cnn_weights.resolve())])
        seen = networks_saw(opts.cnn_weights)
        if seen & set(opts.maps):
            parser.error(f'the networks of {opts.cnn_weights} were trained or validated on '
                         f'cases of map(s) {sorted(seen & set(opts.maps))}: score only the '
                         'maps they did not see (--maps)')
    results, times = {}, {}
    for key in [m for m in runs if m in opts.methods]:
        name, extra = runs[key]
        suffix = ''
        if opts.outline != 'auto':
            name, suffix = f'{name}, --outline {opts.outline}', f'-{opts.outline}'
        extra = [*extra, '--outline', opts.outline]
        if opts.lobule_borders != 'auto' and 'cobra' in extra:
            name = f'{name}, --lobule-borders {opts.lobule_borders}'
            suffix = f'{suffix}-{opts.lobule_borders}'
            extra = [*extra, '--lobule-borders', opts.lobule_borders]
        affine = ''
        if opts.affine_fit != 'symmetric':
            name, affine = f'{name}, --affine-fit {opts.affine_fit}', f'-{opts.affine_fit}'
            suffix = f'{suffix}{affine}'
            extra = [*extra, '--affine-fit', opts.affine_fit]
        if opts.t2w:
            name = f'{name}, T1w+T2w'
        else:
            extra.append('--t1-only')
        for k, fold_labels in folds.items():
            if key in ('template', 'suit', 'template-search'):
                lib_dir = template_only
            elif key.startswith('maps'):
                lib_dir = leave_out_entry(assets, out / f'assets-maps{k}',
                                          [entry_name(k), TEMPLATE_ENTRY])
            else:
                lib_dir = leave_out_entry(assets, out / f'assets-lomo{k}', entry_name(k))
            dst = out / f'out-{key}{suffix}'
            base_key = key.removesuffix('-cnn').removesuffix('-search').removesuffix('-local')
            work = out / f'work-{base_key}{affine}'
            if key == 'jlf-maps':  # the jlf run's registrations, the CoBra entries not fused
                work = out / f'work-jlf{affine}'
            times[name] = times.get(name, 0.0) + run_cerebseg(
                bids, dst, work, lib_dir, ['--participant-label', *fold_labels,
                                           '--skip-brainstem', '--models', 'none', *extra],
                out / f'{dst.name}.log')
            for lab in fold_labels:
                if not key.startswith('jlf'):
                    results.setdefault(name, {})[lab] = (
                        nib.load(anat_file(dst, lab, 'space-T1w_seg-cerebellum_dseg.nii.gz')),
                        read_lut_rows(dst / 'seg-cerebellum_dseg.tsv'))
                    continue
                cached = out / key / f'sub-{lab}_space-T1w_dseg.nii.gz'
                if not cached.is_file():
                    wf = workdir.run_folder(work, f'sub-{lab}')
                    entries = json.loads((lib_dir / 'manifest.json').read_text())[
                        'libraries']['cobra']['entries']
                    keep = [i for i, e in enumerate(entries) if key == 'jlf' or TEMPLATE_ENTRY
                            not in (e['name'], e.get('mirror_of'))]
                    tic = time.perf_counter()
                    fused, aff = joint_fusion(wf / workdir.REGISTER_DIR, wf / workdir.T1_BOX,
                                              len(entries), keep=keep)
                    times['antsJointFusion (fusion only)'] = times.get(
                        'antsJointFusion (fusion only)', 0.0) + time.perf_counter() - tic
                    native_ref = nib.load(bids / f'sub-{lab}' / 'anat' / f'sub-{lab}_T1w.nii.gz')
                    xfm = str(anat_file(dst, lab,
                                        'from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.mat'))
                    cached.parent.mkdir(exist_ok=True)
                    nib.save(nib.Nifti1Image(box_to_native(fused, aff, native_ref, xfm),
                                             native_ref.affine), cached)
                results.setdefault(name, {})[lab] = (
                    nib.load(cached), read_lut_rows(dst / 'seg-cerebellum_dseg.tsv'))
        print(f'{name}: {times[name]:.0f} s for {len(labels)} case(s)', flush=True)

    keys = ['lobule_dice', 'group_dice', 'whole_dice', 'volume_error_pct',
            'lobule_volume_abs_error_pct', 'group_volume_abs_error_pct', 'hd95_mm']
    per_case = []
    for method, by_case in results.items():
        for lab, (img, lut_rows) in by_case.items():
            truth = nib.load(truth_dir / f'sub-{lab}_space-T1w_seg-cerebellum_dseg.nii.gz')
            meta = json.loads((truth_dir / f'sub-{lab}_truth.json').read_text())
            pred = np.asarray(img.dataobj)
            ceres = len(lut_rows) == N_LABELS
            s = score(pred, np.asarray(truth.dataobj), np.asarray(meta['volumes_mm3']),
                      truth.header.get_zooms()[:3], group_table(lut_rows), ceres)
            per_case.append((method, lab, s))
            print(f'{method}, sub-{lab}: lobules {s["lobule_dice"]:.3f}, groups '
                  f'{s["group_dice"]:.3f}, whole {s["whole_dice"]:.3f}, volume '
                  f'{s["volume_error_pct"]:+.1f} %', flush=True)
            if opts.overlays:
                opts.overlays.mkdir(parents=True, exist_ok=True)
                t1 = np.asarray(nib.load(bids / f'sub-{lab}' / 'anat' /
                                         f'sub-{lab}_T1w.nii.gz').dataobj)
                slug = ''.join(c if c.isalnum() else '-' for c in method).strip('-')[:60]
                tru = np.asarray(truth.dataobj)
                title = (f'sub-{lab}, {method}: groups {s["group_dice"]:.3f}, whole '
                         f'{s["whole_dice"]:.3f}, volume {s["volume_error_pct"]:+.1f} %')
                overlay(opts.overlays / f'sub-{lab}_{slug}_whole.png', t1, pred, tru, title)
                lobule_overlay(opts.overlays / f'sub-{lab}_{slug}_lobules.png', t1,
                               to_groups(pred, group_table(lut_rows)),
                               to_groups(tru, CERES_GROUP), title)
    print(f'\nReal anatomy (CoBrALab manual maps, synthesised T1w), native grid, leave one map '
          f'out, {len(labels)} case(s); mean (sd) over cases\n')
    print_score_table(per_case, keys, [
        'mean Dice, 24 CERES lobules', 'mean Dice, 10 lobule groups', 'whole cerebellum Dice',
        'total volume error %', 'mean abs lobule volume error %',
        'mean abs group volume error %', 'HD95 mm'], times, len(labels), dice_digits=3)
    if opts.tsv:
        write_scores_tsv(opts.tsv, per_case, keys)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
