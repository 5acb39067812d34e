"""The brainstem label set (issue 10): protocol, composition from the real atlases, the
Brainstem Navigator path (with a synthetic stand-in folder), and its place in the assets."""
from __future__ import annotations

import copy
import csv
import json
import logging

import nibabel as nib
import numpy as np
import pytest

from cerebseg.assets import available_protocols, package_json
from cerebseg.assets.brainstem_atlas import (
    LUT_COLUMNS,
    PARTS,
    PROTOCOL,
    build_label_set,
    label_volumes,
    part_volumes,
    validate_protocol,
)
from cerebseg.errors import MissingAssetError
from cerebseg.utils.grid import BRAINSTEM_GRID
from cerebseg.utils.labels import side, swap_classes

HO = ('atlases/brainstem/harvard_oxford/'
      'neuroparc_HarvardOxfordsub-maxprob-thr25_space-MNI152NLin6_res-1x1x1.nii.gz')
#: the FSL MNI152 1 mm grid (LAS, origin +90, -126, -72 mm), as the Navigator masks come
FSL_AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])


def _world(img) -> list[np.ndarray]:
    """World coordinates (mm) of the voxel centres of ``img`` along x, y, z."""
    return [img.affine[i, 3] + img.affine[i, i] * np.arange(img.shape[i]) for i in range(3)]


def _centroid(img, mask: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(img.affine, np.argwhere(mask)).mean(axis=0)


@pytest.fixture(scope='module')
def label_set(shared_data):
    return build_label_set(shared_data)


# ---------------------------------------------------------------------------- protocol


def test_protocol_is_valid():
    protocol = package_json(PROTOCOL)
    validate_protocol(protocol)
    listed = {f['path'] for f in package_json('sources.json')['files']}
    files = {s['file'] for s in protocol['sources'].values()} | {
        protocol['registration']['moving'], package_json('templates.json')['brain']}
    assert files <= listed, f'not in sources.json: {sorted(files - listed)}'
    rows = protocol['labels']
    assert {r['part'] for r in rows} == set(PARTS)
    tissue = {(r['part'], r['tissue']) for r in rows if r['kind'] == 'tissue'}
    assert tissue == {(p, t) for p in PARTS for t in ('gm', 'wm')}
    for row in rows:
        if row['kind'] == 'nucleus':
            assert row['description'] and row['source'] in protocol['sources']
    perm = swap_classes([[r['index'], r['name']] for r in rows])
    assert (perm[perm] == np.arange(len(rows))).all()
    # the label set is not an atlas library (no template entries)
    assert 'brainstem' not in available_protocols()
    assert {'suit', 'cobra'} <= set(available_protocols())


@pytest.mark.parametrize('breakage', ['unpaired', 'part', 'duplicate', 'source', 'navigator'])
def test_protocol_errors_are_caught(breakage):
    protocol = copy.deepcopy(package_json(PROTOCOL))
    rows = protocol['labels']
    if breakage == 'unpaired':
        rows[:] = [r for r in rows if r['name'] != 'Right_Red_Nucleus']
    elif breakage == 'part':
        rows[0]['part'] = 'cerebellum'
    elif breakage == 'duplicate':
        rows[1]['index'] = rows[0]['index']
    elif breakage == 'source':
        rows[-1]['source'] = 'no_such_atlas'
    else:
        rows[-1]['index'] = 120
    with pytest.raises(ValueError):
        validate_protocol(protocol)


# ----------------------------------------------------------------- the real label set


def test_parts_are_non_empty_and_ordered(label_set):
    img, lut = label_set
    data = np.asarray(img.dataobj)
    z = _world(img)[2]
    volumes = part_volumes(img, lut)
    medians = {}
    for part in PARTS:
        mask = np.isin(data, [r['index'] for r in lut if r['part'] == part])
        assert mask.sum() == volumes[part] > 1000, part
        medians[part] = float(np.median(np.broadcast_to(z, mask.shape)[mask]))
    assert medians['midbrain'] > medians['pons'] > medians['medulla'], medians
    # the lowest medulla voxel lies below the Talairach floor (z = -47 mm)
    medulla = np.isin(data, [r['index'] for r in lut if r['part'] == 'medulla'])
    assert np.broadcast_to(z, data.shape)[medulla].min() < -60
    # every label and the tissue split are present
    vols = label_volumes(img, lut)
    assert all(v > 0 for v in vols.values()), vols


def test_outline_is_harvard_oxford_with_its_midbrain_completed(shared_data, label_set):
    img, lut = label_set
    ho = nib.load(shared_data / HO)
    ho_volume = float((np.rint(np.asarray(ho.dataobj)) == 8).sum())
    # Harvard-Oxford alone: the outline is its brain stem (within 2 %)
    protocol = copy.deepcopy(package_json(PROTOCOL))
    del protocol['outline']['extend']
    alone, alone_lut = build_label_set(shared_data, protocol)
    assert sum(part_volumes(alone, alone_lut).values()) == pytest.approx(ho_volume, rel=0.02)
    # the default adds the ventral midbrain (Hammersmith) and nothing else
    total = sum(part_volumes(img, lut).values())
    assert ho_volume < total < 1.15 * ho_volume
    extra = sum(part_volumes(img, lut)[p] - part_volumes(alone, alone_lut)[p]
                for p in ('pons', 'medulla'))
    assert extra == 0
    # the box has at least 8 mm of margin, except below the FSL grid's floor (z = -72 mm)
    data = np.asarray(img.dataobj) > 0
    for axis in range(3):
        profile = data.any(axis=tuple(a for a in range(3) if a != axis))
        first, last = np.flatnonzero(profile)[[0, -1]]
        assert first >= 8 and len(profile) - 1 - last >= 8, axis
    x = _world(img)[0]
    assert np.allclose(x, -x[::-1])


def test_nuclei_inside_outline_on_their_side(shared_data, label_set):
    img, _ = label_set
    data = np.asarray(img.dataobj)
    protocol = package_json(PROTOCOL)
    nuclei = [r for r in protocol['labels'] if r['kind'] == 'nucleus']
    assert len(nuclei) == 10
    for row in nuclei:
        mask = data == row['index']
        # at least 60 % of each source nucleus is kept (1 mm sources: voxels = mm3)
        source = nib.load(shared_data / protocol['sources'][row['source']]['file'])
        total = np.isin(np.rint(np.asarray(source.dataobj)), row['values']).sum()
        assert mask.sum() > 0.6 * total, (row['name'], mask.sum(), total)
        cx, _, cz = _centroid(img, mask)
        s = side(row['name'])
        if s:
            assert np.sign(cx) == s and abs(cx) > 2, (row['name'], cx)
        else:
            assert abs(cx) < 2, (row['name'], cx)
        if 'Coeruleus' in row['name']:         # upper pons
            assert -36 < cz < -20, (row['name'], cz)
        else:                                  # midbrain, and the raphe at its lower end
            assert cz > -26, (row['name'], cz)
    # the nuclei add no voxel to the outline of the tissue labels alone
    tissue_only = copy.deepcopy(protocol)
    tissue_only['labels'] = [r for r in protocol['labels'] if r['kind'] == 'tissue']
    outline = np.asarray(build_label_set(shared_data, tissue_only)[0].dataobj) > 0
    assert ((data > 0) == outline).all()


def test_swapped_source_sides_are_refused(shared_data):
    protocol = copy.deepcopy(package_json(PROTOCOL))
    for row in protocol['labels']:
        if row['name'].endswith('Red_Nucleus'):
            row['values'] = [108] if row['name'].startswith('Left') else [8]
    with pytest.raises(ValueError, match='swapped'):
        build_label_set(shared_data, protocol)


def test_lateral_labels_mirror_onto_each_other(label_set):
    img, lut = label_set
    data = np.asarray(img.dataobj).astype(np.int64)
    perm = swap_classes([[r['index'], r['name']] for r in lut])
    index = np.array([r['index'] for r in lut])
    to_class = np.zeros(index.max() + 1, np.int64)
    to_class[index] = np.arange(len(index))
    mirrored = index[perm[to_class[data[::-1]]]]      # the box is symmetric about x = 0
    assert (index[perm[to_class[mirrored[::-1]]]] == data).all()
    outline, outline_m = data > 0, mirrored > 0
    assert 2 * (outline & outline_m).sum() / (outline.sum() + outline_m.sum()) > 0.9
    for k, row in enumerate(lut):
        if side(row['name']):
            a, b = data == row['index'], mirrored == row['index']
            mirror = lut[perm[k]]['name']
            assert side(mirror) == -side(row['name'])
            assert mirror.split('_', 1)[1] == row['name'].split('_', 1)[1]
            # the mirror of the right label lands on the left one (centroids within 3 mm)
            assert np.linalg.norm(_centroid(img, a) - _centroid(img, b)) < 3.0, row['name']
            assert 0.5 < b.sum() / a.sum() < 2.0, row['name']


def test_lut_columns(label_set):
    from cerebseg.assets.brainstem_atlas import lut_tsv

    _, lut = label_set
    text = lut_tsv(lut).splitlines()
    assert tuple(text[0].split('\t')) == LUT_COLUMNS
    rows = [dict(zip(LUT_COLUMNS, line.split('\t'))) for line in text[1:]]
    assert rows[0]['name'] == 'background' and rows[0]['part'] == 'n/a'
    assert all(r['part'] in PARTS and r['licence'] and r['source'] for r in rows[1:])
    assert any('CC BY 4.0' in r['licence'] for r in rows)


# ---------------------------------------------------------- Brainstem Navigator stand-in


def make_navigator(folder, blobs: dict[str, tuple[int, tuple[float, float, float]]]):
    """A stand-in Brainstem Navigator folder: ``{name: (Region_Index, centre_mm)}`` -> a ball of
    radius 2 mm per mask on the FSL grid (float64, as the real masks), plus the lookup csv."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = (182, 218, 182)
    xyz = nib.affines.apply_affine(FSL_AFFINE, np.indices(shape).reshape(3, -1).T)
    with open(folder / 'Brainstem_Navigator_lookup.csv', 'w', newline='') as fobj:
        writer = csv.writer(fobj)
        writer.writerow(['Region_Index', 'Region_Name'])
        for name, (value, centre) in blobs.items():
            writer.writerow([value, name])
            ball = (np.linalg.norm(xyz - np.asarray(centre), axis=1) <= 2.0).reshape(shape)
            nib.save(nib.Nifti1Image(ball.astype(np.float64), FSL_AFFINE),
                     str(folder / f'{name}.nii.gz'))
    return folder


NAVIGATOR_BLOBS = {'DR': (4, (0.5, -27.0, -10.0)), 'LC_l': (9, (-5.0, -36.0, -27.0)),
                   'LC_r': (10, (6.0, -36.0, -27.0)), 'PAG': (20, (0.5, -31.0, -6.0))}


@pytest.fixture(scope='module')
def navigator(tmp_path_factory):
    return make_navigator(tmp_path_factory.mktemp('navigator'), NAVIGATOR_BLOBS)


def test_navigator_extends_and_replaces(shared_data, navigator, label_set):
    img, lut = build_label_set(shared_data, navigator=navigator)
    names = {r['name']: r for r in lut}
    # the open-atlas nuclei of the same structures are gone, the others stay
    for gone in ('Left_Locus_Coeruleus', 'Right_Locus_Coeruleus', 'Dorsal_Raphe'):
        assert gone not in names
    assert 'Median_Raphe' in names and 'Left_Red_Nucleus' in names
    data = np.asarray(img.dataobj)
    for name, (value, centre) in NAVIGATOR_BLOBS.items():
        label = {'LC_l': 'Left_LC', 'LC_r': 'Right_LC'}.get(name, name)
        row = names[label]
        assert row['index'] == 100 + value and row['restricted']
        assert 'Navigator' in row['source'] and 'distribut' in row['licence']
        mask = data == row['index']
        assert 20 < mask.sum() <= 33, label
        assert np.allclose(_centroid(img, mask), centre, atol=1.0)
    assert names['Left_LC']['part'] == 'pons' and names['PAG']['part'] == 'midbrain'
    swap_classes([[r['index'], r['name']] for r in lut])
    # the open labels are unchanged where the Navigator paints nothing
    base = np.asarray(label_set[0].dataobj)
    untouched = ~np.isin(data, [r['index'] for r in lut if r.get('restricted')]) & \
        ~np.isin(base, [13, 14, 15])
    assert (data[untouched] == base[untouched]).all()


def test_navigator_folder_errors(shared_data, tmp_path):
    with pytest.raises(MissingAssetError, match='Brainstem_Navigator_lookup.csv'):
        build_label_set(shared_data, navigator=tmp_path)
    folder = make_navigator(tmp_path / 'nav', {'LC_l': (9, (-5.0, -36.0, -27.0))})
    (folder / 'LC_l.nii.gz').unlink()
    with pytest.raises(MissingAssetError, match='LC_l.nii.gz'):
        build_label_set(shared_data, navigator=folder)


def test_navigator_assets_are_restricted(shared_data, navigator, tmp_path, monkeypatch,
                                         caplog):
    """build_assets with a Navigator folder: manifest flags and warning (the SyN is replaced by
    an identity resampling to keep this fast; the real one runs in test_assets_brainstem)."""
    from cerebseg.assets import brainstem_atlas as brainstem
    from cerebseg.assets.build import build_assets
    from cerebseg.assets.locate import load_assets
    from cerebseg.utils.images import to_label_image

    def identity_carry(labels, sources, protocol, grid, seed=0):
        data = np.rint(brainstem.sample(labels, grid, 0))
        t1 = nib.Nifti1Image(np.zeros(grid.shape, np.float32), grid.affine)
        return to_label_image(data, grid.affine), t1, {'type': 'identity (test)'}

    monkeypatch.setattr(brainstem, 'carry_to_frame', identity_carry)
    with caplog.at_level(logging.WARNING, logger='cerebseg.assets.brainstem_atlas'):
        build_assets(shared_data, tmp_path / 'assets', libraries=(),
                     brainstem_navigator=navigator)
    assert any('must' in r.message and 'this machine' in r.message for r in caplog.records)
    assets = load_assets(tmp_path / 'assets')
    assert assets.restricted and assets.manifest['restricted']
    section = assets.brainstem()
    assert section['restricted'] and 'distribut' in section['restricted_reason']
    lut = assets.path(section['lut']).read_text()
    assert 'Left_LC' in lut and 'Left_Locus_Coeruleus' not in lut
    with pytest.raises(ValueError, match='no-brainstem'):
        build_assets(shared_data, tmp_path / 'other', libraries=(), brainstem=False,
                     brainstem_navigator=navigator)


def test_assets_cli_passes_the_navigator(tmp_path, navigator, monkeypatch):
    from cerebseg.assets import build
    from cerebseg.bids_app.assets_cli import main

    seen = {}
    monkeypatch.setattr(build, 'build_assets', lambda *a, **kw: seen.update(kw) or 'manifest')
    assert main(['build', '--sources', str(tmp_path), '--out', str(tmp_path / 'o'),
                 '--brainstem-navigator', str(navigator)]) == 0
    assert seen['brainstem'] and seen['brainstem_navigator'] == navigator
    assert main(['build', '--sources', str(tmp_path), '--no-brainstem']) == 0
    assert not seen['brainstem'] and seen['brainstem_navigator'] is None
    for argv in (['--brainstem-navigator', str(tmp_path / 'missing')],
                 ['--brainstem-navigator', str(navigator), '--no-brainstem']):
        with pytest.raises(SystemExit) as err:
            main(['build', '--sources', str(tmp_path)] + argv)
        assert err.value.code == 2


# ------------------------------------------------------------------ in the built assets


def test_assets_brainstem(assets_dir, label_set):
    """The label set carried to MNI152NLin2009cAsym by the real SyN (in the shared assets)."""
    from cerebseg.assets.locate import load_assets
    from cerebseg.utils.labels import read_lut

    assets = load_assets(assets_dir, verify=False)
    if 'brainstem' not in assets.manifest:
        pytest.skip(f'{assets_dir} was built without the brainstem label set')
    section = assets.brainstem()
    assert not section['restricted'] and not assets.restricted
    assert section['grid'] == BRAINSTEM_GRID.to_dict()
    dseg, t1 = (nib.load(assets.path(section[k])) for k in ('dseg', 't1w'))
    assert dseg.shape == t1.shape == BRAINSTEM_GRID.shape
    assert np.allclose(dseg.affine, BRAINSTEM_GRID.affine)
    assert np.asarray(t1.dataobj).max() > 0
    lut = read_lut(assets.path(section['lut']))
    assert [n for _, n in lut] == [r['name'] for r in label_set[1]]
    header = assets.path(section['lut']).read_text().splitlines()[0].split('\t')
    assert tuple(header) == LUT_COLUMNS
    data = np.asarray(dseg.dataobj)
    assert set(np.unique(data)) == {i for i, _ in lut}
    # volumes are kept by the SyN to within 10 % (whole brainstem within 3 %)
    vols = section['volumes_mm3']
    total6 = sum(v['MNI152NLin6Asym'] for v in vols.values())
    total9 = sum(v['MNI152NLin2009cAsym'] for v in vols.values())
    assert total9 == pytest.approx(total6, rel=0.03)
    for name, v in vols.items():
        if v['MNI152NLin6Asym'] > 300:
            assert v['MNI152NLin2009cAsym'] == pytest.approx(v['MNI152NLin6Asym'], rel=0.25), name
    assert section['registration']['correlation'] > section['registration'][
        'correlation_before']
    # parts ordered in z, and the brainstem clear of the box's sides
    z = _world(dseg)[2]
    medians = [np.median(np.broadcast_to(z, data.shape)[np.isin(data, section['parts'][p])])
               for p in PARTS]
    assert medians[0] > medians[1] > medians[2]
    inside = data > 0
    for axis in range(3):
        profile = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        assert profile[0] >= 6 and BRAINSTEM_GRID.shape[axis] - 1 - profile[-1] >= 6, axis
    json.dumps(section)
