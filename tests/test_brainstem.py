"""Brainstem on a subject: the label set carried by registration, part volumes, the graph."""
import numpy as np
import pytest
from scipy import ndimage

from cerebseg.models.brainstem_methods import register_label_set
from cerebseg.utils.brainstem_parts import part_rows
from cerebseg.utils.native import morph_table


def _phantom(shift_vox=0.0, shape=(40, 44, 48)):
    """A smooth ellipsoidal 'brainstem' (bright) with two lateral 'nuclei' (dark), shifted."""
    grid = np.indices(shape).astype(np.float32)
    centre = np.array(shape, np.float32)[:, None, None, None] / 2
    centre[1] += shift_vox
    d = ((grid - centre) / np.array([8, 9, 14], np.float32)[:, None, None, None]) ** 2
    body = d.sum(0) < 1
    labels = np.where(body, 1, 0).astype(np.int16)
    for side, lab in ((-1, 2), (1, 3)):
        c = centre.copy()
        c[0] += side * 4
        labels[((grid - c) ** 2).sum(0) < 9] = lab
    image = np.where(labels == 1, 1.0, np.where(labels > 1, 0.4, 0.05)).astype(np.float32)
    return ndimage.gaussian_filter(image, 1.0), labels


def test_label_set_follows_the_anatomy():
    """A template shifted by 3 voxels from the subject: the warped labels land on the
    subject's structures (Dice of each label > 0.8), probabilities sum to one."""
    import torch

    torch.set_num_threads(1)
    template, labels = _phantom(0.0)
    subject, truth = _phantom(3.0)
    probs, dseg = register_label_set(subject, template, labels, 4, spacing=1.0)
    assert probs.shape == (4,) + subject.shape
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    for lab in (1, 2, 3):
        a, b = dseg == lab, truth == lab
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        before = 2 * ((labels == lab) & b).sum() / ((labels == lab).sum() + b.sum())
        assert dice > 0.8 and dice > before + 0.1, (lab, dice, before)


def test_label_set_refuses_mismatched_grids():
    template, labels = _phantom()
    with pytest.raises(ValueError, match='same grid'):
        register_label_set(template[:-1], template, labels, 4)
    with pytest.raises(ValueError, match='0..3'):
        register_label_set(template, template, labels + 1, 4)


def test_part_rows_in_the_volume_table():
    lut = [{'index': 0, 'name': 'background', 'part': 'n/a'},
           {'index': 1, 'name': 'Midbrain_GM', 'part': 'midbrain'},
           {'index': 2, 'name': 'Left_Red_Nucleus', 'part': 'midbrain'},
           {'index': 3, 'name': 'Pons_GM', 'part': 'pons'},
           {'index': 4, 'name': 'Medulla_GM', 'part': 'medulla'}]
    labels = np.zeros((10, 10, 10), np.int16)
    labels[:2], labels[2:3], labels[3:6], labels[6:7] = 1, 2, 3, 4
    rows = [r.split('\t') for r in morph_table(labels, (1.0, 1.0, 2.0), lut, 1e6,
                                               summary=part_rows).splitlines()]
    named = {r[1]: float(r[2]) for r in rows[1:]}
    assert named['Midbrain'] == 600.0 and named['Pons'] == 600.0 and named['Medulla'] == 200.0
    assert named['Whole_Brainstem'] == 1400.0
    assert [r[0] for r in rows[-4:]] == ['n/a'] * 4


def test_network_path_checks_its_labels_and_returns_probabilities(tmp_path):
    """The network method: every slice through the checkpoint's slicing, probabilities that
    sum to one, labels decided outline first; weights of another label set are refused."""
    import torch

    from cerebseg.models.brainstem_methods import segment_with_network
    from cerebseg.models.checkpoint import CheckpointError, save_brainstem_net as save_model
    from cerebseg.models.nets2d import build_model
    from cerebseg.utils.native import decide_labels

    torch.set_num_threads(1)
    torch.manual_seed(0)
    names = ['background', 'Brainstem_WM', 'Left_Nucleus', 'Right_Nucleus']
    model = build_model('ndeconet', 'resnet18', in_channels=3, n_classes=4, encoder_width=8,
                        width=8)
    slicing = {'size': 32, 'context': 1, 'crop': 24, 'center': None}
    path = save_model(tmp_path / 'net.pt', model, {
        'channels': ['T1w-1', 'T1w', 'T1w+1'], 'labels': names, 'slicing': slicing})
    image, _ = _phantom(shape=(30, 32, 12))
    probs, dseg = segment_with_network(image, path, names)
    assert probs.shape == (4, 30, 32, 12) and dseg.shape == (30, 32, 12)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(dseg, decide_labels(probs, foreground_first=True))
    assert (probs[0, :3] == 1).all(), 'outside the 24-voxel window: background'
    with pytest.raises(CheckpointError, match=r"net\.pt was trained on 4 brainstem labels.*"
                                              r"class 2: 'Left_Nucleus' against 'Left_RN'"):
        segment_with_network(image, path, names[:2] + ['Left_RN', 'Right_RN'])
