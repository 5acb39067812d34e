"""The shipped weights and their manifest (:mod:`cerebseg.models.checkpoint`): a missing,
corrupt or changed file is refused with exit 126, naming the file and the fix, before any
work starts."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import SUIT

from cerebseg.models import checkpoint as cpt
from cerebseg.models.checkpoint import CheckpointError
from cerebseg.utils.images import sha256sum


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """The shipped weights folder, copied, and made the one cerebseg reads."""
    folder = tmp_path / 'weights'
    shutil.copytree(cpt.WEIGHTS_DIR, folder)
    monkeypatch.setattr(cpt, 'WEIGHTS_DIR', folder)
    monkeypatch.setattr(cpt, 'WEIGHTS_MANIFEST', folder / 'manifest.json')
    monkeypatch.setattr(cpt, 'DEFAULT_CASCADE', folder / 'deepceres.json')
    monkeypatch.setattr(cpt, 'DEFAULT_BRAINSTEM', folder / 'brainstem_ndeconet_T1w.pt')
    return folder


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_every_shipped_file_with_its_checksum():
    files = cpt.shipped_files()
    on_disk = {p.name for p in cpt.WEIGHTS_DIR.iterdir()
               if p.suffix in ('.pt', '.json') and p.name != 'manifest.json'}
    assert set(files) == on_disk
    for name, entry in files.items():
        assert sha256sum(cpt.WEIGHTS_DIR / name) == entry['sha256'], name
        assert (cpt.WEIGHTS_DIR / name).stat().st_size == entry['bytes'], name
    assert {e['family'] for e in files.values()} == {'cascade', 'cascade manifest', 'brainstem'}
    chosen = cpt.select_weights(t2w=True, prior=True)   # the shipped files pass
    assert len(chosen['lobules']['files']) == 2
    assert cpt.read_brainstem_meta(cpt.DEFAULT_BRAINSTEM)['labels'][0]


@pytest.mark.parametrize('name', ['lobules_unet_T1w-prior.pt', 'hemisphere_dpn_T1w-prior.pt',
                                  'deepceres.json'])
def test_a_changed_cascade_file_is_refused(shipped_copy, name):
    _flip_a_byte(shipped_copy / name)
    with pytest.raises(CheckpointError, match=rf'{name} is corrupt or was changed: its sha256 '
                       r'is [0-9a-f]{64}.*Reinstall cerebseg') as err:
        cpt.select_weights(t2w=False, prior=True)
    assert err.value.exit_code == 126


def test_a_changed_brainstem_network_is_refused(shipped_copy):
    _flip_a_byte(cpt.DEFAULT_BRAINSTEM)
    with pytest.raises(CheckpointError, match='brainstem_ndeconet_T1w.pt is corrupt'):
        cpt.read_brainstem_meta(cpt.DEFAULT_BRAINSTEM)
    with pytest.raises(CheckpointError, match='brainstem_ndeconet_T1w.pt is corrupt'):
        cpt.load_brainstem_net(cpt.DEFAULT_BRAINSTEM)


def test_missing_files_are_refused(shipped_copy):
    (shipped_copy / 'lobules_dpn_T1w-prior.pt').unlink()
    with pytest.raises(CheckpointError, match=r'weights not found: .*lobules_dpn_T1w-prior\.pt'
                       r'.*reinstall cerebseg'):
        cpt.select_weights(t2w=False, prior=True)
    (shipped_copy / 'manifest.json').unlink()
    with pytest.raises(CheckpointError, match=r'weights manifest .*manifest\.json is missing or '
                       r'corrupt.*reinstall cerebseg'):
        cpt.select_weights(t2w=True, prior=True)


def test_each_protocol_has_its_default_weights(shipped_copy):
    """The default networks are chosen by label protocol. The CERES-protocol (cobra) networks
    that ship read a T2w and decide the outline only; a T1w-only cobra run, or a protocol
    without shipped networks, is told how to run (exit 126)."""
    assert cpt.select_weights(t2w=False, prior=True, protocol='suit')['manifest'] == \
        str(shipped_copy / 'deepceres.json')
    chosen = cpt.select_weights(t2w=True, prior=True, protocol='cobra', models='unet')
    assert chosen['manifest'] == str(shipped_copy / 'deepceres_cobra.json')
    assert (chosen['variant'], chosen['role']) == ('T1w+T2w+prior', 'outline')
    assert [cpt.read_cascade_checkpoint(f)['inputs'] for f in chosen['lobules']['files']] == \
        [['T1w', 'T2w', 'prior']]
    with pytest.raises(CheckpointError, match=r'deepceres_cobra\.json has no weights for the '
                       r'inputs T1w\+prior; it has \[\'T1w\+T2w\+prior\'\].*--models none') as err:
        cpt.select_weights(t2w=False, prior=True, protocol='cobra')
    assert err.value.exit_code == 126
    (shipped_copy / 'deepceres_cobra.json').unlink()
    with pytest.raises(CheckpointError, match=r'no networks for the cobra label protocol ship '
                       r'with cerebseg \(deepceres_cobra\.json\); run with --models none'):
        cpt.select_weights(t2w=True, prior=True, protocol='cobra')


def test_a_manifest_says_what_its_lobule_networks_decide(tmp_path):
    """``role``: labels unless the manifest says outline (per variant or for all); outline needs
    the prior; anything else is refused naming the manifest."""
    folder = tmp_path / 'mine'
    shutil.copytree(cpt.WEIGHTS_DIR, folder)
    (folder / 'manifest.json').unlink()
    manifest = folder / 'deepceres.json'
    spec = json.loads(manifest.read_text())
    assert cpt.select_weights(manifest, t2w=False, prior=True)['role'] == 'labels'
    manifest.write_text(json.dumps({**spec, 'role': 'outline'}))
    assert cpt.select_weights(manifest, t2w=True, prior=True)['role'] == 'outline'
    spec['variants']['T1w+prior']['role'] = 'outline'
    manifest.write_text(json.dumps(spec))
    assert cpt.select_weights(manifest, t2w=False, prior=True)['role'] == 'outline'
    assert cpt.select_weights(manifest, t2w=True, prior=True)['role'] == 'labels'
    spec['variants']['T1w+prior']['role'] = 'lobules'
    manifest.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"deepceres\.json: the role .* 'lobules'"):
        cpt.select_weights(manifest, t2w=False, prior=True)
    spec['variants']['T1w'] = dict(spec['variants']['T1w+prior'], role='outline')
    manifest.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match='run without --no-atlas-prior'):
        cpt.select_weights(manifest, t2w=False, prior=False)


def test_user_manifests_may_carry_checksums(tmp_path):
    """Weights a user trained (--cnn-weights): not checked against the shipped manifest, but
    against the sha256 their own manifest gives, where it gives one."""
    folder = tmp_path / 'mine'
    shutil.copytree(cpt.WEIGHTS_DIR, folder)
    (folder / 'manifest.json').unlink()
    spec = json.loads((folder / 'deepceres.json').read_text())
    entry = spec['variants']['T1w+prior']['lobules'][0]
    entry['sha256'] = sha256sum(folder / entry['file'])
    (folder / 'deepceres.json').write_text(json.dumps(spec))
    assert cpt.select_weights(folder / 'deepceres.json', t2w=False, prior=True)
    _flip_a_byte(folder / entry['file'])
    with pytest.raises(CheckpointError, match=rf'{entry["file"]} is corrupt or was changed.*'
                       'deepceres.json'):
        cpt.select_weights(folder / 'deepceres.json', t2w=False, prior=True)


def test_the_command_stops_with_126_naming_the_file(shipped_copy, shared_data, assets_dir,
                                                     tmp_path, capsys):
    from cerebseg.bids_app.run import main

    _flip_a_byte(shipped_copy / 'lobules_dpn_T1w-T2w-prior.pt')
    code = main([str(shared_data / 'bids/multimodal'), str(tmp_path / 'out'), 'participant',
                 '--participant-label', 'ixi002', '--assets-dir', str(assets_dir), *SUIT,
                 '-w', str(tmp_path / 'work'), '--models', 'ensemble',
                 '--skip-bids-validation'])
    assert code == 126
    err = capsys.readouterr().err
    assert 'lobules_dpn_T1w-T2w-prior.pt is corrupt or was changed' in err
    assert 'Reinstall cerebseg' in err
    assert not (tmp_path / 'work').exists() or not any((tmp_path / 'work').rglob('*.nii.gz'))
