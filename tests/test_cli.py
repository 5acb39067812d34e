"""The command line on bad inputs (clear errors, exit codes) and end to end on a real subject."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cerebseg.assets import ASSETS_FORMAT
from cerebseg.bids_app.run import main
from conftest import COARSE_FIT, SUIT, make_bad_nifti, make_bids, make_nifti


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def test_missing_assets_exit_126(tmp_path, caplog):
    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz']})
    empty = tmp_path / 'assets'
    empty.mkdir()
    code = main([str(root), str(tmp_path / 'out'), 'participant', '--assets-dir', str(empty),
                 '-w', str(tmp_path / 'work')])
    assert code == 126
    assert 'cerebseg-assets build' in caplog.text


def test_assets_without_the_default_library_say_both_ways_out(tmp_path):
    """Assets built before cobra became the default hold SUIT only: the default run stops with
    exit 126 saying how to build cobra and how to keep running SUIT."""
    from cerebseg.assets import DEFAULT_BUILD, DEFAULT_LIBRARY
    from cerebseg.assets.locate import Assets
    from cerebseg.errors import MissingAssetError

    assert DEFAULT_LIBRARY == 'cobra' and set(DEFAULT_BUILD) == {'cobra', 'suit'}
    assets = Assets(tmp_path, {'libraries': {'suit': {}}})
    with pytest.raises(MissingAssetError) as err:
        assets.library(DEFAULT_LIBRARY)
    assert err.value.exit_code == 126
    assert "'cobra' is not in" in str(err.value)
    assert 'cerebseg-assets build --library cobra --sources' in str(err.value)
    assert '--atlas-library suit' in str(err.value)


def test_an_output_folder_of_another_protocol_is_refused(tmp_path):
    """A dataset segmented with SUIT (the default before) and continued with the cobra
    default into the same output folder: refused (exit 2) before its lookup table is replaced,
    naming the folder's protocol and both ways on; the same protocol (colours aside) goes on."""
    from cerebseg.bids_app.execution import check_output_protocol
    from cerebseg.errors import UsageError

    def lut(path, names, colour='#ff0000'):
        path.write_text('index\tname\tcolor\n0\tbackground\t#000000\n' + ''.join(
            f'{i}\t{n}\t{colour}\n' for i, n in enumerate(names, 1)))
        return path

    suit = lut(tmp_path / 'suit.tsv', ['Left_I_IV', 'Right_I_IV'])
    cobra = {'name': 'cobra', 'lut': str(lut(tmp_path / 'cobra.tsv', ['Left_I-II', 'Left_III']))}
    luts = {'suit': suit, 'cobra': cobra['lut']}
    out = tmp_path / 'out'
    out.mkdir()
    check_output_protocol(out, cobra, luts)                 # a new folder
    lut(out / 'seg-cerebellum_dseg.tsv', ['Left_I-II', 'Left_III'], colour='#00ff00')
    check_output_protocol(out, cobra, luts)                 # the same labels, other colours
    lut(out / 'seg-cerebellum_dseg.tsv', ['Left_I_IV', 'Right_I_IV'])
    with pytest.raises(UsageError, match="'suit' protocol") as err:
        check_output_protocol(out, cobra, luts)
    assert err.value.exit_code == 2 and '--atlas-library suit' in str(err.value)
    assert 'another output folder' in str(err.value)
    lut(out / 'seg-cerebellum_dseg.tsv', ['Something_else'])
    with pytest.raises(UsageError, match='names other labels'):
        check_output_protocol(out, cobra, luts)


def test_missing_brainstem_asset_file_exit_126(tmp_path):
    """An assets folder whose manifest lists a brainstem label set without its files stops the
    command with exit 126 naming the file, not a traceback when the lookup table is copied."""
    from types import SimpleNamespace

    from cerebseg.assets.locate import Assets
    from cerebseg.bids_app.metadata import brainstem_paths
    from cerebseg.errors import MissingAssetError

    make_nifti(tmp_path / 'bs' / 't1.nii.gz')
    make_nifti(tmp_path / 'bs' / 'dseg.nii.gz')
    assets = Assets(tmp_path, {'brainstem': {'t1w': 'bs/t1.nii.gz', 'dseg': 'bs/dseg.nii.gz',
                                             'lut': 'bs/lut.tsv'}})
    cfg = SimpleNamespace(skip_brainstem=False, brainstem_method='atlas')
    with pytest.raises(MissingAssetError, match=r'bs/lut\.tsv is missing.*--skip-brainstem') \
            as err:
        brainstem_paths(assets, cfg)
    assert err.value.exit_code == 126


def test_corrupt_asset_exit_126(tmp_path, caplog):
    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz']})
    assets = tmp_path / 'assets'
    make_nifti(assets / 'tpl.nii.gz')
    (assets / 'manifest.json').write_text(json.dumps(
        {'format': ASSETS_FORMAT, 'files': {'tpl.nii.gz': '0' * 64}, 'libraries': {}}))
    code = main([str(root), str(tmp_path / 'out'), 'participant', '--assets-dir', str(assets)])
    assert code == 126
    assert 'sha256 mismatch' in caplog.text and 'tpl.nii.gz' in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize('case, code, message', [
    ('empty', 65, 'dataset_description.json is missing'),
    ('unknown', 2, "Participant(s) ['99'] not found"),
    ('no_t1w', 65, 'No T1w image for sub-01'),
    ('truncated', 65, 'truncated or not a NIfTI'),
    ('2d', 65, 'is 2D'),
    ('4d', 65, 'is 4D'),
    ('nan', 65, 'NaN'),
    ('voxel', 65, 'voxel sizes'),
])
def test_bad_inputs(tmp_path, assets_dir, caplog, case, code, message):
    root = tmp_path / 'ds'
    if case == 'empty':
        root.mkdir()
    elif case == 'no_t1w':
        make_bids(root, {'01': ['anat/sub-01_T2w.nii.gz']})
    else:
        make_bids(root, {'01': ['anat/sub-01_T1w.nii.gz']})
        if case != 'unknown':
            make_bad_nifti(root / 'sub-01/anat/sub-01_T1w.nii.gz', case)
    out = tmp_path / 'out'
    (out / 'sub-02/anat').mkdir(parents=True)
    (out / 'sub-02/anat/sub-02_seg-cerebellum_morph.tsv').write_text('kept')
    before = _digest(root)
    label = '99' if case == 'unknown' else '01'
    rc = main([str(root), str(out), 'participant', '--participant-label', label,
               '--assets-dir', str(assets_dir), *SUIT, '-w', str(tmp_path / 'work')])
    assert rc == code
    assert message in caplog.text
    assert _digest(root) == before, 'inputs must never be modified'
    assert (out / 'sub-02/anat/sub-02_seg-cerebellum_morph.tsv').read_text() == 'kept'


def _single_subject_bids(root: Path, t1w: Path, t2w: Path | None = None) -> Path:
    make_bids(root, {})
    anat = root / 'sub-01' / 'anat'
    anat.mkdir(parents=True)
    shutil.copyfile(t1w, anat / 'sub-01_T1w.nii.gz')
    if t2w is not None:
        shutil.copyfile(t2w, anat / 'sub-01_T2w.nii.gz')
    return root


@pytest.mark.integration
def test_unregistrable_t2w_is_refused(tmp_path, shared_data, assets_dir, caplog):
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(np.random.default_rng(0).random((96, 96, 80)), 2) * 1000
    fake_t2 = make_nifti(tmp_path / 'noise_T2w.nii.gz', data=noise.astype(np.float32),
                         zooms=(2.0, 2.0, 2.0))
    root = _single_subject_bids(tmp_path / 'ds',
                                shared_data / 'bids/multimodal/sub-ixi002/anat/'
                                              'sub-ixi002_T1w.nii.gz', fake_t2)
    rc = main([str(root), str(tmp_path / 'out'), 'participant', '--assets-dir',
               str(assets_dir), *SUIT, *COARSE_FIT, '-w', str(tmp_path / 'work'),
               '--skip-brainstem'])  # (CI time)
    assert rc == 65
    assert 'could not be registered to its T1w' in caplog.text


@pytest.fixture(scope='module')
def real_run(shared_data, assets_dir, tmp_path_factory):
    """ds002748 sub-01 through the DeepCeres ensemble cascade with prior (``--models
    ensemble``; the default, multi-atlas labels alone, runs in test_real_anatomy)."""
    bids = shared_data / 'bids/ds002748'
    root = tmp_path_factory.mktemp('real')
    out, work = root / 'out', root / 'work'
    argv = [str(bids), str(out), 'participant', '--participant-label', '01',
            '--assets-dir', str(assets_dir), *SUIT, '-w', str(work), '--models', 'ensemble']
    code = main(argv)
    return {'bids': bids, 'out': out, 'work': work, 'argv': argv, 'code': code}


@pytest.mark.integration
def test_work_folder_contract(real_run):
    """Every node output that the trainers and benchmarks read
    (:mod:`cerebseg.workflows.workdir`) is where the contract says, in the work folder of a
    real run, and holds an image of the box it names."""
    import nibabel as nib

    from cerebseg.workflows import workdir

    assert real_run['code'] == 0
    run = workdir.run_folder(real_run['work'], 'sub-01')
    assert workdir.run_folders(real_run['work']) == [run]
    for name, rel in workdir.NODE_OUTPUTS.items():
        found = sorted(run.glob(rel))
        assert found, f'{name}: nothing at {run / rel}'
        for path in found:
            if path.name.endswith('.nii.gz'):
                assert len(nib.load(path).shape) >= 3, path
            else:   # the box affine: an ITK transform
                assert path.stat().st_size > 0, path
    # the two boxes: 0.5 mm around the cerebellum, 1 mm around the brainstem
    assert nib.load(run / workdir.T1_BOX).header.get_zooms()[:3] == pytest.approx((0.5,) * 3)
    assert nib.load(run / workdir.BS_T1_BOX).header.get_zooms()[:3] == pytest.approx((1,) * 3)
    assert nib.load(run / workdir.BS_DSEG_BOX).shape == nib.load(run / workdir.BS_T1_BOX).shape


@pytest.mark.integration
def test_end_to_end_real_subject(real_run):
    """Every output, on the right grid, plausible; the networks' uncertainty is reported."""
    bids, out, argv = real_run['bids'], real_run['out'], real_run['argv']
    assert real_run['code'] == 0
    anat = out / 'sub-01/anat'
    box = 'sub-01_space-MNI152NLin2009cAsym_seg-cerebellum_res-05'
    expected = ['sub-01_space-T1w_seg-cerebellum_dseg.nii.gz',
                'sub-01_space-T1w_seg-cerebellum_dseg.json',
                f'{box}_dseg.nii.gz', f'{box}_desc-prior_dseg.nii.gz',
                f'{box}_uncertainty.nii.gz', f'{box}_uncertainty.json',
                'sub-01_space-MNI152NLin2009cAsym_res-05_desc-preproc_T1w.nii.gz',
                'sub-01_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.mat',
                'sub-01_seg-cerebellum_morph.tsv']
    for name in expected:
        assert (anat / name).is_file(), name
    for name in ('dataset_description.json', 'seg-cerebellum_dseg.tsv'):
        assert (out / name).is_file()
    assert list(out.glob('sub-01/log/*/cerebseg.toml'))
    assert not list(out.rglob('.*.nii.gz*')), 'no temporary files left'

    t1 = nib.load(bids / 'sub-01/anat/sub-01_T1w.nii.gz')
    dseg = nib.load(anat / 'sub-01_space-T1w_seg-cerebellum_dseg.nii.gz')
    assert dseg.shape == t1.shape[:3]
    np.testing.assert_allclose(dseg.affine, t1.affine, atol=1e-4)
    lut = [line.split('\t') for line in (out / 'seg-cerebellum_dseg.tsv').read_text()
           .splitlines()[1:]]
    indices = {int(r[0]) for r in lut}
    present = set(np.unique(np.asarray(dseg.dataobj)).astype(int))
    assert present <= indices and len(present) > 30
    total_cm3 = (np.asarray(dseg.dataobj) > 0).sum() * np.prod(t1.header.get_zooms()[:3]) / 1e3
    assert 100 < total_cm3 < 180, f'cerebellum {total_cm3:.1f} cm3'
    # left labels lie left of right labels (RAS world x)
    ijk = {lab: np.argwhere(np.asarray(dseg.dataobj) == lab).mean(0) for lab in (5, 7)}
    xyz = {lab: nib.affines.apply_affine(t1.affine, v) for lab, v in ijk.items()}
    assert xyz[5][0] < xyz[7][0], 'Left_VI must be left of Right_VI'
    meta = json.loads((anat / 'sub-01_space-T1w_seg-cerebellum_dseg.json').read_text())
    assert meta['Mode'] == 'T1w' and meta['Sources'] == ['bids:raw:sub-01/anat/sub-01_T1w.nii.gz']
    assert meta['TemplateFitCorrelation'] > 0.3 and meta['IntracranialVolume_mm3'] > 9e5
    assert meta['LabelProtocol'].startswith('the SUIT protocol (Diedrichsen 2009)')
    assert meta['LabelProtocol'] in meta['Description']
    nets = meta['Method']['Networks']
    assert nets['Inputs'] == 'T1w+prior'
    assert [n['Architecture'] for n in nets['Lobules']['Networks']] == ['unet', 'dpn']
    desc = json.loads((out / 'dataset_description.json').read_text())
    assert desc['DatasetType'] == 'derivative' and desc['GeneratedBy'][0]['Name'] == 'cerebseg'
    # the networks agree with their prior on most of the cerebellum, not everywhere
    cnn = np.asarray(nib.load(anat / f'{box}_dseg.nii.gz').dataobj)
    prior = np.asarray(nib.load(anat / f'{box}_desc-prior_dseg.nii.gz').dataobj)
    both = (cnn > 0) | (prior > 0)
    assert 0.6 < (cnn[both] == prior[both]).mean() < 1.0
    unc = np.asarray(nib.load(anat / f'{box}_uncertainty.nii.gz').dataobj)
    assert unc.min() >= 0 and unc.max() <= 1 and unc[cnn > 0].mean() > 0
    morph = [line.split('\t') for line in
             (anat / 'sub-01_seg-cerebellum_morph.tsv').read_text().splitlines()]
    assert morph[0][-1] == 'uncertainty' and len(morph) == 35
    assert all(0 <= float(r[-1]) <= 1 for r in morph[1:] if r[-1] != 'n/a')

    # the brainstem (on by default): native labels, volumes with the part sums, anatomy
    bs = nib.load(anat / 'sub-01_space-T1w_seg-brainstem_dseg.nii.gz')
    assert bs.shape == t1.shape[:3]
    np.testing.assert_allclose(bs.affine, t1.affine, atol=1e-4)
    for name in ('sub-01_space-T1w_seg-brainstem_dseg.json', 'sub-01_seg-brainstem_morph.tsv',
                 'sub-01_space-MNI152NLin2009cAsym_seg-brainstem_res-1_dseg.nii.gz'):
        assert (anat / name).is_file(), name
    bs_lut = {r.split('\t')[1]: int(r.split('\t')[0]) for r in
              (out / 'seg-brainstem_dseg.tsv').read_text().splitlines()[1:]}
    bs_vol = {r.split('\t')[1]: float(r.split('\t')[2]) for r in
              (anat / 'sub-01_seg-brainstem_morph.tsv').read_text().splitlines()[1:]}
    assert 20e3 < bs_vol['Whole_Brainstem'] < 45e3, bs_vol['Whole_Brainstem']
    assert bs_vol['Whole_Brainstem'] == pytest.approx(
        bs_vol['Midbrain'] + bs_vol['Pons'] + bs_vol['Medulla'], abs=1.0)
    bs_data = np.asarray(bs.dataobj)

    def centre(names):
        mask = np.isin(bs_data, [bs_lut[n] for n in names])
        return nib.affines.apply_affine(bs.affine, np.argwhere(mask).mean(0))

    z = [centre([f'{p}_GM', f'{p}_WM'])[2] for p in ('Midbrain', 'Pons', 'Medulla')]
    assert z[0] > z[1] > z[2], f'midbrain, pons, medulla at z = {z}'
    assert centre(['Left_Red_Nucleus'])[0] < centre(['Right_Red_Nucleus'])[0]
    bs_meta = json.loads((anat / 'sub-01_space-T1w_seg-brainstem_dseg.json').read_text())
    assert bs_meta['LookupTable'] == 'seg-brainstem_dseg.tsv'

    # a re-run with the same work folder resumes and gives the same labels
    first = hashlib.sha256(np.asarray(dseg.dataobj).tobytes()).hexdigest()
    assert main(argv) == 0
    again = nib.load(anat / 'sub-01_space-T1w_seg-cerebellum_dseg.nii.gz')
    assert hashlib.sha256(np.asarray(again.dataobj).tobytes()).hexdigest() == first
    # group level gathers the volumes (details on synthetic trees: test_group.py)
    assert main([str(bids), str(out), 'group', '--group-by', 'group']) == 0
    group_cb = (out / 'group_seg-cerebellum_morph.tsv').read_text().splitlines()
    assert len(group_cb) == 2 and group_cb[1].startswith('sub-01\tn/a\tn/a\t')
    header = group_cb[0].split('\t')
    assert {'Left_VI', 'Left_VI_icv', 'Left_VI_z', 'total_icv', 'group'} <= set(header)
    row = dict(zip(header, group_cb[1].split('\t')))
    assert float(row['Left_VI']) == pytest.approx(float(morph[5][2]))
    assert row['n_outliers'] == '0'  # alone, no one is an outlier
    group_bs = (out / 'group_seg-brainstem_morph.tsv').read_text().splitlines()
    assert 'Whole_Brainstem' in group_bs[0].split('\t') and group_bs[1].startswith('sub-01')
    assert 'href="sub-01.html"' in (out / 'group_report.html').read_text()
    assert (out / 'group_qc.tsv').is_file()
    # the participant report, its figures and the status of each run
    for name in ('sub-01_space-MNI152NLin2009cAsym_T1w.svg', 'sub-01_seg-cerebellum_dseg.svg',
                 'sub-01_seg-brainstem_dseg.svg'):
        assert (out / 'sub-01/figures' / name).is_file(), name
    statuses = sorted(out.glob('sub-01/log/*/sub-01_status.json'))
    assert len(statuses) == 2, 'one status per run (the first and the resumed one)'
    status = json.loads(statuses[-1].read_text())
    assert status['exit_code'] == 0 and status['elapsed_s'] > 0
    page = (out / 'sub-01.html').read_text()
    assert 'sub-01/figures/sub-01_seg-brainstem_dseg.svg' in page and 'Left_VI' in page
    preproc = json.loads((anat / 'sub-01_space-MNI152NLin2009cAsym_res-05_desc-preproc_T1w.json')
                         .read_text())
    assert preproc['SkullStripped'] is True and 'Resolution' in preproc
    assert nib.load(anat / 'sub-01_space-T1w_seg-cerebellum_dseg.nii.gz').header \
        .get_xyzt_units() == ('mm', 'sec')


def _validator() -> str:
    exe = shutil.which('bids-validator-deno') or str(Path(sys.executable).parent /
                                                     'bids-validator-deno')
    if not Path(exe).is_file():
        pytest.fail('bids-validator-deno is not installed (pip install bids-validator-deno)')
    return exe


@pytest.mark.integration
def test_outputs_pass_bids_validator(real_run):
    """The official validator (3.0.2) finds no error in a real output folder; the warnings
    left are the ones the README explains."""
    assert real_run['code'] == 0
    out = real_run['out']
    assert main([str(real_run['bids']), str(out), 'group']) == 0   # group files too
    proc = subprocess.run([_validator(), '--json', str(out)], capture_output=True, text=True,
                          timeout=900)
    issues = json.loads(proc.stdout)['issues']['issues']
    errors = [(i['code'], i.get('location')) for i in issues if i['severity'] == 'error']
    assert errors == []
    assert {i['code'] for i in issues} <= {'SIDECAR_KEY_RECOMMENDED', 'TOO_FEW_AUTHORS'}, \
        sorted({i['code'] for i in issues})


@pytest.mark.integration
def test_reports_load_in_chromium(real_run):
    """sub-01.html and group_report.html load from disk in headless chromium with no console
    message and every image rendered; the screenshots are kept (test-artifacts/)."""
    from browser import check_page

    assert real_run['code'] == 0
    out = real_run['out']
    assert main([str(real_run['bids']), str(out), 'group', '--group-by', 'group']) == 0
    keep = Path(os.environ.get('CEREBSEG_TEST_ARTIFACTS',
                               Path(__file__).resolve().parents[1] / 'test-artifacts'))
    for page in ('sub-01.html', 'group_report.html'):
        result = check_page(out / page, screenshot=keep / page.replace('.html', '.png'))
        assert result['console'] == [], (page, result['console'])
        assert all(i['ok'] for i in result['images']), (page, result['images'])
        assert (keep / page.replace('.html', '.png')).stat().st_size > 10_000
    assert len(check_page(out / 'sub-01.html')['images']) == 3
    assert 'sub-01.html' in check_page(out / 'group_report.html')['links']


@pytest.mark.integration
def test_brainstem_network_on_real_subject(real_run):
    """--brainstem-method network with the shipped weights, in the work folder of the real run
    (its preprocessing reused): labels on the T1w grid that agree with the atlas method's,
    anatomy in order, the network named in the sidecar, the affine written."""
    assert real_run['code'] == 0
    out = real_run['out'].parent / 'out-network'
    argv = [str(real_run['bids']), str(out), 'participant', '--participant-label', '01',
            '--assets-dir', real_run['argv'][real_run['argv'].index('--assets-dir') + 1], *SUIT,
            '-w', str(real_run['work']), '--skip-cerebellum', '--brainstem-method', 'network']
    assert main(argv) == 0
    anat = out / 'sub-01/anat'
    net = nib.load(anat / 'sub-01_space-T1w_seg-brainstem_dseg.nii.gz')
    atlas = nib.load(real_run['out'] / 'sub-01/anat/sub-01_space-T1w_seg-brainstem_dseg.nii.gz')
    assert net.shape == atlas.shape
    np.testing.assert_allclose(net.affine, atlas.affine, atol=1e-4)
    a, b = np.asarray(net.dataobj), np.asarray(atlas.dataobj)
    whole = 2 * ((a > 0) & (b > 0)).sum() / ((a > 0).sum() + (b > 0).sum())
    assert whole > 0.9, f'whole-brainstem Dice network vs atlas {whole:.3f}'
    same = (a == b)[(a > 0) | (b > 0)].mean()
    assert same > 0.6, f'labels agree on {same:.2f} of the brainstem'
    lut = {r.split('\t')[1]: int(r.split('\t')[0]) for r in
           (out / 'seg-brainstem_dseg.tsv').read_text().splitlines()[1:]}

    def centre(names):
        return nib.affines.apply_affine(net.affine, np.argwhere(
            np.isin(a, [lut[n] for n in names])).mean(0))

    z = [centre([f'{p}_GM', f'{p}_WM'])[2] for p in ('Midbrain', 'Pons', 'Medulla')]
    assert z[0] > z[1] > z[2], z
    assert centre(['Left_Red_Nucleus'])[0] < centre(['Right_Red_Nucleus'])[0]
    meta = json.loads((anat / 'sub-01_space-T1w_seg-brainstem_dseg.json').read_text())
    assert meta['Method']['Network']['Decoder'] == 'ndeconet'
    assert (anat / 'sub-01_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.mat').is_file()


@pytest.mark.integration
def test_train_and_eval_on_real_subject(real_run, assets_dir, tmp_path, capsys):
    """cerebseg-train segmentation (reusing the run's work folder) and cerebseg-eval."""
    import torch

    from cerebseg.bids_app.evaluate import main as eval_main
    from cerebseg.bids_app.train import main as train_main
    from cerebseg.models.checkpoint import load_cascade_net as load_checkpoint

    assert real_run['code'] == 0
    out, ckpt = real_run['out'], tmp_path / 'lobules.pt'
    rc = train_main(['segmentation', str(real_run['bids']), '--labels', str(out),
                     '--out', str(ckpt), '--participant-label', '01',
                     '--assets-dir', str(assets_dir), '--work-dir', str(real_run['work']),
                     '--architecture', 'dpn', '--features', '16', '8', '--epochs', '3',
                     '--steps-per-epoch', '6', '--patch-size', '32', '--batch-size', '2',
                     '--learning-rate', '1e-2', '--nthreads', '2', '--half',
                     # from chance, not from the prior (the residual starts at the prior's
                     # loss, and a few patches' noise hides the learning)
                     '--no-prior-residual'])
    assert rc == 0
    model, meta = load_checkpoint(ckpt, inputs=['T1w', 'prior'], stage='lobules',
                                  protocol='suit')
    history = meta['training']['history']
    assert len(history) == 3 and history[-1]['loss'] < history[0]['loss'], history
    assert meta['training']['train'] == ['sub-01'] and meta['config']['features'] == [16, 8]
    state = torch.load(ckpt.with_name(ckpt.name + '.state.pt'), weights_only=True)
    for key, value in model.state_dict().items():  # fp16 checkpoint = last weights
        torch.testing.assert_close(value, state['weights'][key], atol=2e-3, rtol=1e-2)
    # the networks against their own prior, scored by cerebseg-eval
    table = tmp_path / 'eval.tsv'
    assert eval_main(['--reference', str(out), '--method', f'prior={out}', '--desc',
                      'prior=prior', '--method', f'cascade={out}', '--out', str(table)]) == 0
    rows = {r.split('\t')[0]: r.split('\t') for r in table.read_text().splitlines()}
    assert float(rows['Mean over labels'][3]) == pytest.approx(1.0)  # cascade vs itself
    assert 0.5 < float(rows['Whole cerebellum'][1]) < 1.0             # prior vs cascade
    assert 'Whole cerebellum' in capsys.readouterr().out


def test_cuda_requested_without_gpu_exit_2(tmp_path, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz']})
    rc = main([str(root), str(tmp_path / 'out'), 'participant', '--device', 'cuda'])
    assert rc == 2 and 'no CUDA device' in caplog.text


def test_skipping_both_structures_exit_2(tmp_path, caplog):
    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz']})
    rc = main([str(root), str(tmp_path / 'out'), 'participant', '--skip-brainstem',
               '--skip-cerebellum', '--device', 'cpu'])
    assert rc == 2 and 'leave nothing to do' in caplog.text


@pytest.mark.integration
def test_brainstem_network_weights_are_checked_first(tmp_path, assets_dir, caplog):
    """--brainstem-method network: missing weights, or weights of another label set, stop the
    run before any work (exit 126) with the file and the way out."""
    from cerebseg.models.checkpoint import save_brainstem_net as save_model
    from cerebseg.models.nets2d import build_model

    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz']})
    base = [str(root), str(tmp_path / 'out'), 'participant', '--assets-dir', str(assets_dir),
            *SUIT, '-w', str(tmp_path / 'work'), '--skip-cerebellum',
            '--brainstem-method', 'network',
            '--skip-bids-validation']
    assert main(base + ['--brainstem-weights', str(tmp_path / 'none.pt')]) == 126
    assert 'brainstem network weights not found' in caplog.text and 'none.pt' in caplog.text
    model = build_model('ndeconet', 'resnet18', n_classes=3, encoder_width=8, width=8)
    other = save_model(tmp_path / 'other.pt', model,
                       {'channels': ['T1w'], 'labels': ['background', 'a', 'b']})
    caplog.clear()
    assert main(base + ['--brainstem-weights', str(other)]) == 126
    assert 'other.pt was trained on other brainstem labels' in caplog.text
    assert not (tmp_path / 'work').exists()


def _complete(path: Path) -> None:
    """A file with a final name must be whole: NIfTIs load to the last voxel, JSON parses,
    TSVs have a header and rows."""
    if path.name.endswith('.nii.gz'):
        np.asarray(nib.load(path).dataobj)
    elif path.suffix == '.json':
        json.loads(path.read_text())
    elif path.suffix == '.tsv':
        assert len(path.read_text().splitlines()) >= 2, path
    elif path.stat().st_size == 0:
        raise AssertionError(f'{path} is empty')


BRAINSTEM_ONE_THREAD = ['--skip-cerebellum', '--omp-nthreads', '1', '--nprocs', '1',
                        *COARSE_FIT]


@pytest.fixture(scope='module')
def two_commands(ds002748_2mm, assets_dir, tmp_path_factory):
    """Two ``cerebseg`` processes writing participants 01 and 02 (at 2 mm, brainstem, one
    thread) into one output and work folder at the same time."""
    bids = ds002748_2mm
    root = tmp_path_factory.mktemp('two')
    out, work = root / 'out', root / 'work'
    base = [sys.executable, '-m', 'cerebseg.bids_app.run', str(bids), str(out), 'participant',
            '--assets-dir', str(assets_dir), *SUIT, '-w', str(work), *BRAINSTEM_ONE_THREAD]
    procs = [subprocess.Popen(base + ['--participant-label', label], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for label in ('01', '02')]
    logs = [p.communicate()[0].decode(errors='replace') for p in procs]
    return {'bids': bids, 'out': out, 'work': work, 'codes': [p.returncode for p in procs],
            'logs': logs}


@pytest.mark.integration
def test_two_commands_share_one_output_folder(two_commands, assets_dir, tmp_path):
    """Both commands finish, the shared files are whole and as a lone writer writes them, and
    the group level reads both participants (issue 13)."""
    from types import SimpleNamespace

    from cerebseg.assets.locate import load_assets
    from cerebseg.bids_app.execution import finalize
    from cerebseg.bids_app.metadata import brainstem_paths

    bids, out = two_commands['bids'], two_commands['out']
    assert two_commands['codes'] == [0, 0], two_commands['logs']
    alone = tmp_path / 'alone'
    cfg = SimpleNamespace(output_dir=str(alone), bids_dir=str(bids), skip_brainstem=False,
                          brainstem_method='atlas')
    finalize(cfg, None, brainstem_paths(load_assets(str(assets_dir)), cfg))
    for name in ('dataset_description.json', 'seg-brainstem_dseg.tsv', 'seg-brainstem_dseg.json',
                 'descriptions.tsv', '.bidsignore', 'README.md'):
        _complete(out / name)
        assert (out / name).read_bytes() == (alone / name).read_bytes(), name
    desc = json.loads((out / 'dataset_description.json').read_text())
    assert desc['DatasetType'] == 'derivative'
    for label in ('01', '02'):
        assert (out / f'sub-{label}/anat/sub-{label}_space-T1w_seg-brainstem_dseg.nii.gz').is_file()
        assert list(out.glob(f'sub-{label}/log/*/*_status.json'))
    assert not list(out.rglob('.*.nii.gz*')), 'temporary files left'
    group = tmp_path / 'group'
    shutil.copytree(out, group)
    assert main([str(bids), str(group), 'group']) == 0
    rows = (group / 'group_seg-brainstem_morph.tsv').read_text().splitlines()
    assert len(rows) == 3, rows[:1]


@pytest.mark.integration
def test_kill_9_then_resume_gives_identical_outputs(two_commands, assets_dir, tmp_path):
    """``kill -9`` of the whole run (its process group: the child processes too) just after
    its first output is written; no file with a final name is half-written; the same command
    again resumes from the work folder and gives byte-identical outputs to the uninterrupted
    run of the same participant with the same options (issue 13).

    The work folder is new, so every node runs again (part before the kill, the rest after):
    this also checks that the same input and options give byte-identical outputs from scratch.
    (A brainstem-only participant at 2 mm with the coarse affine, against the two commands'
    participant 01, for CI time; the cerebellum's registrations and fusion are run again from
    scratch in ``test_real_anatomy``.)"""
    import signal
    import time

    out, work = tmp_path / 'out', tmp_path / 'work'
    argv = [str(two_commands['bids']), str(out), 'participant', '--participant-label', '01',
            '--assets-dir', str(assets_dir), *SUIT, '-w', str(work), *BRAINSTEM_ONE_THREAD]
    log = open(tmp_path / 'killed.log', 'wb')
    proc = subprocess.Popen([sys.executable, '-m', 'cerebseg.bids_app.run', *argv],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    anat = out / 'sub-01' / 'anat'
    final = anat / 'sub-01_space-T1w_seg-brainstem_dseg.nii.gz'
    deadline = time.monotonic() + 900
    try:
        while not [p for p in anat.glob('*') if not p.name.startswith('.')]:
            assert proc.poll() is None, 'the run ended before it could be killed'
            assert time.monotonic() < deadline, 'no output after 15 min'
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert not final.exists(), 'killed too late: the run had finished'
    for _ in range(60):   # a process in a system call dies when the call returns
        listing = subprocess.run(['ps', '-o', 'pid=,stat=', '-g', str(proc.pid)],
                                 capture_output=True, text=True).stdout.split('\n')
        alive = [line for line in listing if line.strip() and 'Z' not in line.split()[-1]]
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, f'processes of the killed run still alive after 30 s: {alive}'
    for path in out.rglob('*'):
        if path.is_file() and not path.name.startswith('.'):
            _complete(path)
    assert main(argv) == 0
    first = _digest(two_commands['out'] / 'sub-01/anat')
    resumed = {k: v for k, v in _digest(anat).items() if not Path(k).name.startswith('.')}
    assert sorted(first) == sorted(resumed)   # (a write cut by the kill may leave a hidden temp)
    assert not [n for n in first if first[n] != resumed[n]], 'resumed outputs differ'


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted for the test (root only), resized by the test; unmounted after."""
    mnt = tmp_path / 'disk'
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs',
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip('needs root to mount a small tmpfs')
    yield mnt
    subprocess.run(['umount', '-l', str(mnt)], check=False)


@pytest.mark.integration
def test_full_disk_keeps_what_was_written(two_commands, assets_dir, tmp_path, small_disk,
                                          caplog):
    """The output folder fills up while a participant's outputs are written: exit 74 with a
    clear message; the outputs that were there before (participant 01, the root files) are
    still there, unchanged and valid; no file with a final name is half-written (issue 13).
    Participant 02 resumes from the two commands' work folder: only its outputs are written
    here, onto a disk with room for a third of them."""
    out = small_disk / 'out'
    shutil.copytree(two_commands['out'], out, ignore=shutil.ignore_patterns('sub-02*'))
    base = [str(two_commands['bids']), str(out), 'participant', '--assets-dir', str(assets_dir),
            *SUIT, '-w', str(two_commands['work']), *BRAINSTEM_ONE_THREAD]
    before = _digest(out)
    need = sum(p.stat().st_size for p in (two_commands['out'] / 'sub-02').rglob('*')
               if p.is_file())
    stat = os.statvfs(small_disk)
    size_kb = (stat.f_blocks - stat.f_bfree) * stat.f_frsize // 1024 + need // 3 // 1024
    subprocess.run(['mount', '-o', f'remount,size={size_kb}k', str(small_disk)], check=True)
    caplog.clear()
    assert main(base + ['--participant-label', '02']) == 74, caplog.text
    assert 'no space left on the device' in caplog.text and 'run the same command again' \
        in caplog.text
    assert 'while writing the outputs of' in caplog.text, 'the disk filled before the outputs'
    after = _digest(out)
    assert {k: v for k, v in after.items() if k in before} == before, 'earlier outputs changed'
    for path in out.rglob('*'):
        if path.is_file() and not path.name.startswith('.'):
            _complete(path)
