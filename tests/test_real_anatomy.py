"""End to end on real individual anatomy (issue 22): a case made from a manual lobule map
(CoBrALab brain1, its image synthesised from the labels) segmented by the real command with
``--atlas-library cobra``, from a library that has not seen that map in any form: the other two
manual maps and their mirrors, without the CoBra atlas (the maximum-probability map of the five
CoBrALab maps, brain1 among them); the lobule votes come from the SUIT atlas (20 other
people). The map is painted at 0.5 mm (the benchmark: 0.3 mm) for CI
time. Scored on the native grid against the map; the run's sidecar says how the outline was
trimmed and how many voxels the white-matter branches moved to another lobule; the same case
with the borders as fused scores lower. Two of its nodes (the torch registration of the lobule-vote
entries and their fusion) run again from scratch give byte-identical outputs.

The case has a T2w of the same anatomy (its T1w is the same as without it; the cobra library has no
T2w to fuse), so the same work folder also runs the CERES-protocol network that ships (issue 22:
``deepceres_cobra.json``, a T1w+T2w U-Net with the outline role, ``MODEL_CARD_cobra.md``) with
``--models unet``: it moves the outline a little, the lobules stay the prior's, and the sidecar
says so. That network was trained on all three maps, brain1 among them, so only its behaviour is
checked here, not its accuracy (the model card has the leave-one-map-out figures)."""
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_case_bids

MAP = 'atlases/cerebellum/CoBrALab-manual/cerebellum/labels/brain{}_labels.mnc'
TEMPLATE = 'templates/MNI152NLin2009cAsym/MNI152_2009_template.nii.gz'
LOBULES = [*range(1, 13), *range(14, 26)]
#: the cerebellum label map of a run, in its output folder (.nii.gz, .json)
DSEG = 'sub-brain1/anat/sub-brain1_space-T1w_seg-cerebellum_dseg'


def _volume_error(img: nib.Nifti1Image, case) -> float:
    """Signed total volume error of a native-grid label map against the case's exact
    partial-volume truth."""
    from cerebseg.utils.preproc import nonzero_volume_ml

    ml = nonzero_volume_ml(np.asarray(img.dataobj), img.header.get_zooms()[:3])
    return 1000 * ml / case.volumes_mm3[1:].sum() - 1


def _repeat_from_scratch(done: Path, base_dir: Path) -> tuple[dict, dict]:
    """Run the node whose work folder is ``done`` again in a new folder on the same inputs;
    the sha256 of its image outputs in ``done`` and in the new folder."""
    from nipype.utils.filemanip import loadpkl

    node = loadpkl(done / '_node.pklz')
    node.base_dir = str(base_dir)
    node._hierarchy = node._output_dir = None
    again = Path(node.run().runtime.cwd)
    assert again != done
    names = sorted(p.name for p in again.iterdir() if p.name.endswith('.nii.gz'))
    assert names, done
    return tuple({n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}
                 for folder in (done, again))


@pytest.mark.integration
@pytest.mark.slow
def test_real_anatomy_case_end_to_end(shared_data, strict_cobra_assets, tmp_path):
    from cerebseg.assets.build import entry_labels
    from cerebseg.assets.manual import manual_case, place_in_template, read_manual_map
    from cerebseg.bids_app.run import main
    from cerebseg.utils.evaluation import dice_per_label, whole_dice

    assets = strict_cobra_assets
    library = json.loads((assets / 'manifest.json').read_text())['libraries']['cobra']
    names = [e['name'] for e in library['entries']]
    assert names == ['CoBrALab-brain2', 'CoBrALab-brain3', 'CoBrALab-brain2Mirror',
                     'CoBrALab-brain3Mirror']
    # the lobule votes: the SUIT atlas on MNI152NLin6AsymC and its mirror, labels = units
    votes = library['lobule_votes']
    assert [e['name'] for e in votes['entries']] == ['suit-MNI152NLin6AsymC',
                                                     'suit-MNI152NLin6AsymCMirror']
    assert votes['n_labels'] == 11 and votes['weight'] == 0.5
    units = np.asarray(nib.load(assets / votes['entries'][0]['files']['dseg']).dataobj)
    mirror = np.asarray(nib.load(assets / votes['entries'][1]['files']['dseg']).dataobj)
    assert set(np.unique(units).tolist()) == set(range(11))
    np.testing.assert_array_equal(mirror, units[::-1])

    manual = read_manual_map(shared_data / MAP.format(1))
    data = np.asarray(manual.dataobj)
    assert set(np.unique(data).tolist()) == set(range(27))      # CERES indices, all present
    assert manual.header.get_zooms()[:3] == pytest.approx((0.3, 0.3, 0.3))
    x_left, x_right = (nib.affines.apply_affine(manual.affine, np.argwhere(data == v).mean(0))[0]
                       for v in (5, 18))                         # left and right VI, RAS world
    assert x_left < -10 < 10 < x_right
    placed = place_in_template(manual, nib.load(shared_data / TEMPLATE),
                               entry_labels(shared_data, 'cobra', 'MNI152NLin2009cAsym'),
                               spacing=0.5)
    case, _ = manual_case(placed, seed=7, supersample=2, t2w=True)
    bids = write_case_bids(tmp_path / 'bids', 'brain1', case, 'real anatomy')
    nib.save(nib.Nifti1Image(np.rint(case.t2w).astype(np.int16), case.t2w_affine),
             bids / 'sub-brain1/anat/sub-brain1_T2w.nii.gz')
    out = tmp_path / 'out'
    # the three commands share one work folder: registrations and fusion run once
    common = ['participant', '--assets-dir', str(assets), '-w', str(tmp_path / 'work'),
              '--skip-bids-validation', '--skip-brainstem', '--atlas-library', 'cobra']
    assert main([str(bids), str(out), *common]) == 0
    result = nib.load(out / f'{DSEG}.nii.gz')
    assert np.allclose(result.affine, case.affine)
    pred = np.asarray(result.dataobj)
    lobules = float(np.nanmean(dice_per_label(pred, case.labels, LOBULES)))
    whole = whole_dice(pred, case.labels)
    error = _volume_error(result, case)
    message = (f'24 lobules {lobules:.3f}, whole {whole:.3f}, total volume '
               f'{100 * error:+.1f} %')
    print(message)     # the measured figures, shown with pytest -s
    assert lobules >= THRESHOLDS['lobules'], message
    assert whole >= THRESHOLDS['whole'], message
    assert abs(error) <= THRESHOLDS['volume'], message
    sidecar = json.loads((out / f'{DSEG}.json').read_text())
    assert 'more CSF than tissue' in sidecar['Method']['Outline']
    assert 'more tissue than CSF' in sidecar['Method']['Outline']
    assert sidecar['OutlineTrimming']['removed_voxels'] > 0
    assert sidecar['OutlineTrimming']['added_voxels'] > 0
    assert 'white-matter branch' in sidecar['Method']['LobuleBorders']
    assert 'SUIT protocol' in sidecar['Method']['LobuleBorders']
    assert sidecar['AtlasLibrary']['LobuleVotes'] == [e['name'] for e in votes['entries']]
    assert sidecar['LobuleBorders']['changed_voxels'] > 0
    assert sidecar['LobuleBorders']['votes_weight'] == 0.5

    # the torch registration of library entries onto the subject and the fusion, run again
    # from scratch on the same inputs, give byte-identical outputs (before they ran
    # single-threaded with a fixed seed, lobule volumes moved by up to 3 % from run to run):
    # on the two lobule-vote entries, which go through the same nodes as the library's four
    # at half the cost (the affines, which brainstem-only runs share: test_cli's kill -9 test,
    # with the coarse fit; a symmetric fit is the mean of two fits, each in a fresh process)
    from cerebseg.workflows import workdir

    run = workdir.run_folders(tmp_path / 'work')[0]
    for rel in (workdir.REGISTER_VOTES, workdir.FUSE_VOTES):
        done, again = _repeat_from_scratch(run / workdir.MULTIATLAS_WF / rel,
                                           tmp_path / f'again-{rel}')
        assert done == again, f'{rel}: outputs differ when run again'

    # the lobule borders as fused: the same work folder (registrations and fusion reused), the
    # same outline in the working box (on the native grid the swapped probabilities move
    # 0.01 % of the voxels), worse lobules
    fused = tmp_path / 'out-fused'
    assert main([str(bids), str(fused), *common, '--lobule-borders', 'fused']) == 0
    pred2 = np.asarray(nib.load(fused / f'{DSEG}.nii.gz').dataobj)
    lobules2 = float(np.nanmean(dice_per_label(pred2, case.labels, LOBULES)))
    message2 = f'{message}; borders as fused: 24 lobules {lobules2:.3f}'
    assert whole_dice(pred2, pred) > 0.995, message2
    assert lobules2 < lobules, message2
    sidecar = json.loads((fused / f'{DSEG}.json').read_text())
    assert 'as fused' in sidecar['Method']['LobuleBorders']

    # the shipped CERES network (T1w+T2w, outline role) on the same prior: the same work folder
    net_out = tmp_path / 'out-unet'
    assert main([str(bids), str(net_out), *common, '--models', 'unet']) == 0
    net_img = nib.load(net_out / f'{DSEG}.nii.gz')
    assert np.allclose(net_img.affine, case.affine)
    net = np.asarray(net_img.dataobj)
    change = (net > 0).sum() / (pred > 0).sum() - 1
    both = (pred > 0) & (net > 0)
    same = (pred[both] == net[both]).mean()
    net_error = _volume_error(net_img, case)
    message3 = (f'{message}; network: cerebellum {100 * change:+.1f} % against the prior, whole '
                f'Dice {whole_dice(net, pred):.3f} with it, same lobule in {100 * same:.1f} % of '
                f'the voxels both label; against the truth whole '
                f'{whole_dice(net, case.labels):.3f}, total volume {100 * net_error:+.1f} %')
    print(message3)   # measured: +1.0 %, 0.985, 99.5 %; truth: whole 0.959, +1.7 %
    assert 0.002 < abs(change) < 0.03, message3      # it moves the outline, a little
    assert whole_dice(net, pred) > 0.97, message3
    assert same > 0.97, message3                     # the lobules are the prior's
    assert set(np.unique(net)) <= set(np.unique(pred)) | {0}
    text = json.dumps(json.loads((net_out / f'{DSEG}.json').read_text()))
    assert '"Role": "outline"' in text
    assert 'lobules_unet_cobra_T1w-T2w-prior.pt' in text


#: a little under what this case measures with the strict library (24 lobules 0.826, whole 0.955,
#: total volume -0.2 % with its T2w and the outline trimmed up to 3 mm deep; one layer: 0.825,
#: 0.954, +0.8 %; 0.827, 0.954, +0.8 % without the T2w: local and non-local voting
#: mixed after the entries' levels are matched, the lobule borders on the white-matter branches
#: with the SUIT atlas's lobule votes, the outline trimmed and grown by the T1w, 2 mm registration
#: control grid, as cobra runs by default). With local voting only (the default before) it measured
#: 0.816, 0.948, -0.3 % and fails ``whole``; without the votes as well 0.768, 0.949, -0.1 % (fails
#: ``lobules``); the outline trimmed only measured 0.763, 0.941, -3.1 % (fails ``whole`` and
#: ``volume``); the borders as fused (``--lobule-borders fused``) 0.742 (groups 0.741); with the
#: outline as fused too 0.725, 0.929, +1.1 %.
THRESHOLDS = {'lobules': 0.81, 'whole': 0.95, 'volume': 0.02}
