"""Working grid -> native space, volumes, lookup tables, relabelling."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cerebseg.assets.build import abbreviate, relabel
from cerebseg.assets.sources import lut_to_tsv
from cerebseg.utils.images import nib_to_ants
from cerebseg.utils.native import (decide_labels, label_volumes, morph_table,
                                  probabilities_to_native)


@pytest.fixture
def identity_mat(tmp_path):
    import ants

    path = str(tmp_path / 'identity.mat')
    ants.write_transform(ants.create_ants_transform('AffineTransform', dimension=3), path)
    return path


def test_thin_structure_survives_resampling(identity_mat):
    """A 1-voxel-thick sheet at 0.5 mm keeps its label on a 1 mm grid."""
    shape = (40, 40, 40)
    probs = np.zeros(shape + (3,), np.float32)
    probs[..., 0] = 1.0
    probs[:, :, 22, :] = 0.0
    probs[:, :, 22, 1] = 1.0  # the thin label: one 0.5 mm slice at z = 11 mm
    probs[:, :, 30:34, :] = 0.0
    probs[:, :, 30:34, 2] = 1.0
    work = nib.Nifti1Image(probs, np.diag([0.5, 0.5, 0.5, 1.0]))
    ref = nib_to_ants(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32),
                                      np.diag([1.0, 1.0, 1.0, 1.0])))
    labels = probabilities_to_native(work, ref, identity_mat)
    assert labels.shape == (20, 20, 20)
    assert (labels[:, :, 11] == 1).all(), 'the thin sheet vanished'
    assert (labels == 1).sum() == 20 * 20
    assert (labels == 2).sum() == 20 * 20 * 2


def test_competing_labels_use_probabilities(identity_mat):
    """Between two 0.5 mm voxels the label with the larger interpolated probability wins."""
    probs = np.zeros((4, 4, 4, 3), np.float32)
    probs[0, ..., 1] = 0.6  # voxel 0: label 1 (0.6) over background (0.4)
    probs[0, ..., 0] = 0.4
    probs[1, ..., 2] = 0.55  # voxel 1: label 2 (0.55) over label 1 (0.45)
    probs[1, ..., 1] = 0.45
    probs[2:, ..., 0] = 1.0
    work = nib.Nifti1Image(probs, np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5  # reference voxel centre half-way between work voxels 0 and 1
    ref = nib_to_ants(nib.Nifti1Image(np.zeros((2, 4, 4), np.float32), shifted))
    labels = probabilities_to_native(work, ref, identity_mat)
    # interpolated: p1 = 0.525, p2 = 0.275, p0 = 0.2 -> label 1, although a nearest-neighbour
    # pick of the label image could give 2
    assert (labels[0] == 1).all()


def test_foreground_first_keeps_the_outline(identity_mat):
    """Background 0.45 against two labels of one structure (0.35, 0.20): the arg-max says
    background, the outline-first decision says the structure, with its most probable label."""
    probs = np.zeros((3, 4, 4, 4), np.float32)
    probs[:, 0] = np.array([0.45, 0.35, 0.20])[:, None, None]
    probs[:, 1] = np.array([0.60, 0.25, 0.15])[:, None, None]
    probs[:, 2:] = np.array([0.1, 0.2, 0.7])[:, None, None, None]
    assert decide_labels(probs)[:, 0, 0].tolist() == [0, 0, 2, 2]
    assert decide_labels(probs, foreground_first=True)[:, 0, 0].tolist() == [1, 0, 2, 2]
    work = nib.Nifti1Image(np.moveaxis(probs, 0, -1), np.eye(4))
    ref = nib_to_ants(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)))
    plain = probabilities_to_native(work, ref, identity_mat)
    outline = probabilities_to_native(work, ref, identity_mat, foreground_first=True)
    assert plain[:, 1, 1].tolist() == [0, 0, 2, 2]
    assert outline[:, 1, 1].tolist() == [1, 0, 2, 2]


def test_outside_the_box_is_background(identity_mat):
    probs = np.zeros((10, 10, 10, 2), np.float32)
    probs[..., 1] = 1.0
    work = nib.Nifti1Image(probs, np.eye(4))
    ref = nib_to_ants(nib.Nifti1Image(np.zeros((30, 30, 30), np.float32), np.eye(4)))
    labels = probabilities_to_native(work, ref, identity_mat)
    assert labels[5, 5, 5] == 1 and labels[25, 25, 25] == 0


def test_only_the_part_the_box_reaches_is_resampled(tmp_path):
    """Labels of a box under an oblique affine, into a grid that it covers a small part of,
    anisotropic and reoriented: identical to resampling every label over the whole grid."""
    import ants

    rng = np.random.default_rng(4)
    probs = rng.random((14, 12, 10, 4)).astype(np.float32)
    probs /= probs.sum(axis=-1, keepdims=True)
    box_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    box_affine[:3, 3] = (2.0, -3.0, 1.0)
    work = nib.Nifti1Image(probs, box_affine)
    xfm = ants.create_ants_transform('AffineTransform', dimension=3)
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                    [0, 0, 1]]) * 1.05
    xfm.set_parameters(np.concatenate([rot.ravel(), [1.5, -0.5, 2.0]]))
    path = str(tmp_path / 'oblique.mat')
    ants.write_transform(xfm, path)
    native = np.array([[0.0, 0.0, -1.2, 20.0], [0.9, 0.0, 0.0, -15.0], [0.0, 1.1, 0.0, -12.0],
                       [0, 0, 0, 1]])
    ref = nib_to_ants(nib.Nifti1Image(np.zeros((30, 40, 36), np.float32), native))
    for foreground_first in (False, True):
        labels = probabilities_to_native(work, ref, path, foreground_first=foreground_first)
        full = [ants.apply_transforms(ref, nib_to_ants(nib.Nifti1Image(probs[..., k],
                                                                       box_affine)),
                                      [path], interpolator='linear', whichtoinvert=[True],
                                      defaultvalue=1.0 if k == 0 else 0.0).numpy()
                for k in range(4)]
        expected = decide_labels(np.stack(full), foreground_first=foreground_first)
        assert 0 < (expected > 0).sum() < expected.size // 10
        np.testing.assert_array_equal(labels, expected)
    # the structure's probability (labels 1-3 together) comes with them when asked, 0 outside
    labels, whole = probabilities_to_native(work, ref, path, with_foreground=True)
    np.testing.assert_array_equal(labels, decide_labels(np.stack(full)))
    np.testing.assert_allclose(whole, np.clip(full[1] + full[2] + full[3], 0, 1), atol=1e-5)
    assert whole.shape == labels.shape and whole[labels > 0].min() > 0.2


def test_volumes_and_table():
    labels = np.zeros((10, 10, 10), np.int16)
    labels[:2] = 1
    labels[2:3] = 2
    vols = label_volumes(labels, (1.0, 2.0, 0.5), 4)
    np.testing.assert_allclose(vols, [700.0, 200.0, 100.0, 0.0])
    lut = [{'index': 0, 'name': 'background'}, {'index': 1, 'name': 'A'},
           {'index': 2, 'name': 'B'}, {'index': 3, 'name': 'C'}]
    rows = morph_table(labels, (1.0, 2.0, 0.5), lut, icv_mm3=1000.0).splitlines()
    assert rows[0] == 'index\tname\tvolume_mm3\tvolume_icv_fraction'
    assert rows[1].startswith('1\tA\t200.0\t2.0')
    assert rows[3].startswith('3\tC\t0.0\t0')


def test_relabel_and_lut():
    data = np.array([[[0, 11, 111, 5]]])
    out = relabel(data, {11: 1, 111: 2})
    np.testing.assert_array_equal(out, [[[0, 1, 2, 0]]])
    assert abbreviate('Left_CrusI') == 'L-CrusI' and abbreviate('Vermis_VI') == 'V-VI'
    tsv = lut_to_tsv([{'index': 0, 'name': 'background', 'abbreviation': 'BG',
                       'color': '#000000'}])
    assert tsv.startswith('index\tname\tabbreviation\tcolor\n0\tbackground')


def test_native_interfaces_carry_the_structure_probability(tmp_path, identity_mat,
                                                          monkeypatch):
    """ProbsToNative(foreground=True) writes the structure's probability beside the labels,
    and TrimOutline given it grows the outline as well as trimming it (its report says how
    much); without it, the outline is only trimmed."""
    from cerebseg.interfaces.native import ProbsToNative, TrimOutline
    from cerebseg.utils.images import to_probseg_image

    shape = (24, 24, 24)
    r = np.sqrt(((np.indices(shape) - 11.5) ** 2).sum(0))
    fg = np.clip(8.5 - r, 0, 1)                              # 1 inside r 7.5, 0 beyond 8.5
    fg[(r > 8.5) & (r < 9.5)] = 0.3                          # some entries went one voxel wider
    probs = np.stack([1 - fg, fg], -1) * 255
    box = tmp_path / 'probseg.nii.gz'
    nib.save(to_probseg_image(np.rint(probs), np.eye(4)), box)
    t1w = tmp_path / 't1w.nii.gz'
    nib.save(nib.Nifti1Image(np.where(r < 9.5, 1000.0, 200.0).astype(np.float32), np.eye(4)),
             t1w)
    def run(interface, folder):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        return interface.run().outputs

    res = run(ProbsToNative(probseg=str(box), reference=str(t1w), t1_to_mni=identity_mat,
                        foreground=True), 'native')
    whole = np.asarray(nib.load(res.foreground).dataobj)
    assert whole[11, 11, 11] == pytest.approx(1.0) and whole[11, 11, 20] == pytest.approx(0.3,
                                                                                         abs=0.01)
    plain = run(ProbsToNative(probseg=str(box), reference=str(t1w), t1_to_mni=identity_mat),
                'plain')
    assert not isinstance(plain.foreground, str)              # not asked: not written
    labels = np.asarray(nib.load(res.out_file).dataobj)
    grown = run(TrimOutline(dseg=res.out_file, t1w=str(t1w), foreground=res.foreground), 'grown')
    trimmed = run(TrimOutline(dseg=res.out_file, t1w=str(t1w)), 'trimmed')
    report = json.loads(Path(grown.report).read_text())['OutlineTrimming']
    assert report['added_voxels'] > 0 and report['added_ml'] == pytest.approx(
        report['added_voxels'] / 1000)
    assert 'added_voxels' not in json.loads(Path(trimmed.report).read_text())[
        'OutlineTrimming']
    out = np.asarray(nib.load(grown.out_file).dataobj)
    assert (out > 0).sum() - (labels > 0).sum() == report['added_voxels'] - report[
        'removed_voxels']
    assert np.array_equal(np.asarray(nib.load(trimmed.out_file).dataobj) > 0,
                          labels > 0)                        # nothing was dark inside r 8.5


def test_trim_depth_is_the_library_constant_and_part_of_the_node_hash(tmp_path, monkeypatch):
    """The interface's default depth is cerebseg.utils.outline.TRIM_DEPTH_MM (three passes on a
    1 mm grid, reported), and the depth is an input: a work folder of a cerebseg that trimmed
    to another depth runs the node again instead of reusing its labels."""
    import nibabel as nib

    from cerebseg.interfaces.native import TrimOutline
    from cerebseg.utils.outline import TRIM_DEPTH_MM

    assert TrimOutline().inputs.depth_mm == TRIM_DEPTH_MM
    labels = np.zeros((40, 40, 40), np.int16)
    labels[4:36, 4:36, 4:36] = 1                             # three voxels too large ...
    tissue = np.zeros(labels.shape, bool)
    tissue[7:33, 7:33, 7:33] = True
    image = np.where(tissue, 1000.0, 200.0).astype(np.float32)   # ... over CSF
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / 'dseg.nii.gz')
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / 't1w.nii.gz')
    node = TrimOutline(dseg=str(tmp_path / 'dseg.nii.gz'), t1w=str(tmp_path / 't1w.nii.gz'))
    monkeypatch.chdir(tmp_path)
    res = node.run().outputs
    report = json.loads(Path(res.report).read_text())['OutlineTrimming']
    assert report['passes'] == 3 and len(report['removed_by_pass']) == 3
    out = np.asarray(nib.load(res.out_file).dataobj)
    assert np.array_equal(out > 0, tissue)
    shallow = TrimOutline(dseg=node.inputs.dseg, t1w=node.inputs.t1w, depth_mm=1.0)
    assert shallow.inputs.get_hashval()[1] != node.inputs.get_hashval()[1]


def _ball_labels(shape=(40, 40, 40), centre=(19.5, 19.5, 19.5), radius=12.0):
    """Two labels (1: the lower, 2: the upper half of a ball) on a 1 mm grid."""
    idx = np.indices(shape).astype(np.float32)
    ball = np.sqrt(((idx - np.array(centre)[:, None, None, None]) ** 2).sum(0)) < radius
    return np.where(ball, np.where(idx[2] < centre[2], 1, 2), 0).astype(np.int16)


def test_outside_image_measures_what_the_image_cuts_off(identity_mat):
    """A native image that ends 6 voxels above the ball's bottom: the share of each label
    outside it is the share of its voxels below the edge, summed over the label maps given
    (two entries, one shifted up by 2 voxels); an image covering them all cuts nothing off;
    the report names the labels above the limit, largest share first."""
    from cerebseg.utils.native import MAX_OUTSIDE_IMAGE, outside_image, outside_report

    labels = _ball_labels()
    up = np.eye(4)
    up[2, 3] = 2.0
    maps = [nib.Nifti1Image(labels, np.eye(4)), nib.Nifti1Image(labels, up)]
    lut = [{'index': 0, 'name': 'background'}, {'index': 1, 'name': 'Lower'},
           {'index': 2, 'name': 'Upper'}, {'index': 3, 'name': 'Absent'}]
    whole = nib_to_ants(nib.Nifti1Image(np.zeros((50, 50, 50), np.float32), np.eye(4)))
    outside, total = outside_image(maps, whole, identity_mat, 4)
    np.testing.assert_array_equal(total, [0, 2 * (labels == 1).sum(), 2 * (labels == 2).sum(),
                                          0])
    assert outside.max() == 0
    report = outside_report(outside, total, lut)
    assert report['NotMeasured'] == [] and report['WholeShareOutside'] == 0
    # the native image starts at z = 14 mm (the ball's bottom: 8 mm, 10 mm in the shifted
    # entry): its first voxel covers the point at 14 fully, at 13 not at all
    cut_affine = np.eye(4)
    cut_affine[2, 3] = 14.0
    cut = nib_to_ants(nib.Nifti1Image(np.zeros((50, 50, 40), np.float32), cut_affine))
    outside, total = outside_image(maps, cut, identity_mat, 4)
    below = [np.bincount(labels[:, :, :14].ravel(), minlength=3),
             np.bincount(labels[:, :, :12].ravel(), minlength=3)]
    np.testing.assert_allclose(outside[:3], [0, below[0][1] + below[1][1], 0])
    assert 0.1 < outside[1] / total[1] < 0.5 and outside[3] == total[3] == 0
    report = outside_report(outside, total, lut)
    assert report['Limit'] == MAX_OUTSIDE_IMAGE
    assert report['NotMeasured'] == ['Lower'] and set(report['ShareOutside']) == {'Lower'}
    assert report['WholeShareOutside'] == pytest.approx(outside.sum() / total.sum(), abs=1e-4)
    # a shallow cut, below the limit, is measured; two cut labels come largest first
    shallow = outside_report(np.array([0.0, 0.01, 0.0]), np.array([0.0, 1.0, 1.0]), lut)
    assert shallow['NotMeasured'] == [] and shallow['WholeShareOutside'] == 0.005
    both = outside_report(np.array([0.0, 0.1, 0.3]), np.array([0.0, 1.0, 1.0]), lut)
    assert both['NotMeasured'] == ['Upper', 'Lower']


def test_labels_cut_off_are_not_measured():
    """The morph table writes n/a for the labels the image cuts off, and for every sum that
    would add them up (the brainstem's parts); the others keep their volumes."""
    from cerebseg.utils.brainstem_parts import part_rows

    labels = np.zeros((10, 10, 10), np.int16)
    labels[:2] = 1
    labels[2:4] = 2
    labels[4:5] = 3
    lut = [{'index': 0, 'name': 'background'},
           {'index': 1, 'name': 'Medulla_GM', 'part': 'medulla'},
           {'index': 2, 'name': 'Pons_GM', 'part': 'pons'},
           {'index': 3, 'name': 'Midbrain_GM', 'part': 'midbrain'}]
    rows = [line.split('\t') for line in morph_table(
        labels, (1.0, 1.0, 1.0), lut, icv_mm3=1000.0, summary=part_rows,
        not_measured=[1]).splitlines()]
    by_name = {r[1]: r[2:] for r in rows[1:]}
    assert by_name['Medulla_GM'] == ['n/a', 'n/a'] and by_name['Medulla'] == ['n/a', 'n/a']
    assert by_name['Whole_Brainstem'] == ['n/a', 'n/a']
    assert by_name['Pons_GM'][0] == '200.0' and by_name['Pons'][0] == '200.0'
    assert by_name['Midbrain'][0] == '100.0'


def test_field_of_view_interface_warns_and_the_volumes_follow(tmp_path, identity_mat,
                                                             monkeypatch, caplog):
    """FieldOfView writes the sidecar's FieldOfView and warns, naming the structure, the file
    and the label; LabelVolumes given its report writes that label n/a. Its limit is the
    library constant."""
    from cerebseg.interfaces.native import FieldOfView, LabelVolumes
    from cerebseg.utils.native import MAX_OUTSIDE_IMAGE

    assert FieldOfView().inputs.limit == MAX_OUTSIDE_IMAGE
    entry = tmp_path / 'entry_dseg.nii.gz'
    nib.save(nib.Nifti1Image(_ball_labels(), np.eye(4)), entry)
    cut_affine = np.eye(4)
    cut_affine[2, 3] = 14.0
    t1w = tmp_path / 't1w.nii.gz'
    nib.save(nib.Nifti1Image(np.zeros((50, 50, 40), np.float32), cut_affine), t1w)
    lut = tmp_path / 'lut.tsv'
    lut.write_text('index\tname\n0\tbackground\n1\tLower\n2\tUpper\n')
    monkeypatch.chdir(tmp_path)
    with caplog.at_level('WARNING', logger='cerebseg.interfaces.native'):
        res = FieldOfView(label_maps=[str(entry)], reference=str(t1w), t1_to_mni=identity_mat,
                          lut=str(lut), structure='cerebellum').run().outputs
    info = json.loads(Path(res.report).read_text())['FieldOfView']
    assert info['NotMeasured'] == ['Lower']
    assert 'ends inside the cerebellum' in caplog.text and str(t1w) in caplog.text
    assert 'Lower' in caplog.text
    dseg = tmp_path / 'dseg.nii.gz'
    labels = np.zeros((50, 50, 40), np.int16)
    labels[10:20, 10:20, 0:5] = 1
    labels[10:20, 10:20, 5:10] = 2
    nib.save(nib.Nifti1Image(labels, cut_affine), dseg)
    kwargs = dict(dseg=str(dseg), lut=str(lut), t1_to_mni=identity_mat, template_icv_ml=1.0)
    table = Path(LabelVolumes(fov=res.report, **kwargs).run().outputs.out_file).read_text()
    assert '1\tLower\tn/a\tn/a' in table and '2\tUpper\t500.0' in table
    plain = Path(LabelVolumes(**kwargs).run().outputs.out_file).read_text()
    assert '1\tLower\t500.0' in plain
