"""2D brainstem training: slicing, 2.5D, crop/resize round trip, split, training, checkpoint, CLI
(synthetic arrays and work folders only)."""
from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cerebseg.models import inference as inf
from cerebseg.training import augment as augmentation
from cerebseg.training import brainstem2d as bt
from cerebseg.workflows import workdir

NAMES = ['background', 'Midbrain_GM', 'Midbrain_WM', 'Left_Red_Nucleus', 'Right_Red_Nucleus']
LABELS = [[i, n] for i, n in enumerate(NAMES)]
SHAPE = (28, 30, 12)  # x, y, z: not square in-plane, so a transposition would show


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def synthetic_case(seed: int, shape=SHAPE, name='sub-01', participant='01') -> bt.Case:
    """An off-centre 'brainstem' (GM ring, WM core, left/right nuclei) on z = 2..9; the T1w is a
    noisy intensity per class."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing='ij')
    cx, cy = 12 + rng.integers(-1, 2), 16 + rng.integers(-1, 2)
    r = np.hypot(x - cx, y - cy)
    plane = np.zeros(shape[:2], np.uint8)
    plane[r < 8] = 1
    plane[r < 5] = 2
    plane[np.hypot(x - (cx - 3), y - cy) < 2] = 3   # rows are x: left is low x
    plane[np.hypot(x - (cx + 3), y - cy) < 2] = 4
    classes = np.zeros(shape, np.uint8)
    classes[:, :, 2:10] = plane[:, :, None]
    means = np.array([0.1, 0.6, 1.0, 0.3, 0.35], np.float32)
    t1 = means[classes] + rng.normal(0, 0.03, shape).astype(np.float32)
    return bt.Case(name, participant, t1.astype(np.float32), classes)


class Oracle(nn.Module):
    """A 'network' whose input is a label map: one-hot logits of its centre channel, rounded."""

    divisor = 1

    def __init__(self, n_classes: int, context: int = 0):
        super().__init__()
        self.config = {'in_channels': 2 * context + 1, 'n_classes': n_classes}
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        centre = x[:, x.shape[1] // 2]
        labels = centre.round().clamp(0, self.config['n_classes'] - 1).long()
        return 20 * F.one_hot(labels, self.config['n_classes']).movedim(-1, 1).float()


def nested_labels(shape=SHAPE) -> np.ndarray:
    """Shells 0 < 1 < 2 < 3 (neighbours differ by 1, so bilinear images round to the right
    label), off-centre and different in every slice."""
    x, y, z = np.meshgrid(*map(np.arange, shape), indexing='ij')
    r = np.maximum(np.abs(x - 11.3) / 1.2, np.abs(y - 17.6)) + 0.3 * (z % 3)
    return np.select([r < 3, r < 6, r < 9], [3, 2, 1], 0).astype(np.uint8)


# ---------------------------------------------------------------------------------- slicing

def test_slice_stack_and_context_channels():
    vol = np.broadcast_to(np.arange(SHAPE[2], dtype=np.float32), SHAPE).copy()
    stack = inf.slice_stack(vol, [0, 5, SHAPE[2] - 1], context=2)
    assert stack.shape == (3, 5) + SHAPE[:2]
    assert stack[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [3, 4, 5, 6, 7], [9, 10, 11, 11, 11]]
    assert inf.Slicing(context=2).channels == ['T1w-2', 'T1w-1', 'T1w', 'T1w+1', 'T1w+2']
    assert inf.Slicing().channels == ['T1w']
    ds = bt.SliceDataset([synthetic_case(0)], inf.Slicing(size=32, context=1, crop=32), margin=1)
    assert ds.images.shape == (10, 3, 32, 32) and ds.labels.shape == (10, 32, 32)
    assert [z for _, z in ds.index] == list(range(1, 11))  # labelled 2..9 plus a margin of 1
    x, y = ds.batch([0, 4])
    assert x.shape == (2, 3, 32, 32) and y.shape == (2, 32, 32) and y.dtype == torch.int64


def test_crop_window_pads_and_warns(caplog):
    assert inf.Slicing(crop=64).window((65, 70)) == (1, 3)   # x 1..64, y 3..66
    assert inf.Slicing(crop=10, center=(5, 5)).window((65, 70)) == (1, 1)
    plane = np.arange(6 * 4, dtype=np.float32).reshape(1, 6, 4) + 1
    out = inf.crop_plane(plane, inf.Slicing(crop=8))
    assert out.shape == (1, 8, 8) and out.sum() == plane.sum()     # padded, nothing lost
    assert out[0, 1, 2] == plane[0, 0, 0] and out[0, 0].sum() == 0
    case = synthetic_case(0)
    with caplog.at_level('WARNING'):
        bt.SliceDataset([case], inf.Slicing(size=16, crop=16))
    assert 'outside the 16-voxel crop' in caplog.text


@pytest.mark.parametrize('size, crop, context', [(32, 32, 0), (64, 32, 1), (96, 40, 2)])
def test_predict_volume_round_trip(size, crop, context):
    labels = nested_labels()
    model = Oracle(4, context)
    probs = inf.predict_volume(model, labels.astype(np.float32), size, context=context, crop=crop,
                              batch_size=5)
    assert probs.shape == (4,) + SHAPE and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    pred = probs.argmax(0)
    if size == crop:
        np.testing.assert_array_equal(pred, labels)
    else:  # resized there and back: boundary voxels may move
        assert (pred == labels).mean() > 0.995
        for k in range(1, 4):
            n = int((labels == k).sum())
            assert abs(int((pred == k).sum()) - n) <= 0.02 * n
    some = inf.predict_volume(model, labels.astype(np.float32), size, context=context, crop=crop,
                             slices=[3, 4])
    np.testing.assert_array_equal(some[:, :, :, [3, 4]], probs[:, :, :, [3, 4]])
    assert (some[0, :, :, 5] == 1).all()
    with pytest.raises(ValueError, match='input channels'):
        inf.predict_volume(model, labels.astype(np.float32), size, context=context + 1, crop=crop)


def test_augmentation_moves_image_and_labels_together():
    labels = nested_labels()[:, :, :4]
    x = torch.from_numpy(np.moveaxis(labels, 2, 0)[:, None].astype(np.float32))
    y = torch.from_numpy(np.moveaxis(labels, 2, 0).astype(np.int64))
    still = {'gamma': (1, 1), 'contrast': (1, 1), 'offset': 0, 'noise': 0}   # no intensity
    aug = augmentation.Augment.slices(p_spatial=1.0, rotate=15, flip=1.0, **still)
    perm = np.array([0, 1, 3, 2])                      # classes 2 and 3 are a left/right pair
    xa, ya = augmentation.augment_batch(x, y, 48, np.random.default_rng(0), aug, perm)
    assert xa.shape == (4, 1, 48, 48) and ya.shape == (4, 48, 48)
    assert (torch.from_numpy(perm)[xa[:, 0].round().long()] == ya).float().mean() > 0.95
    x, y = x[..., :28], y[..., :28]                    # square: size 28 is no resize
    plain = augmentation.Augment.slices(p_spatial=0, flip=1.0, **still)
    xs, ys = augmentation.augment_batch(x, y, 28, np.random.default_rng(0), plain, perm)
    assert torch.equal(ys, torch.from_numpy(perm)[y.flip(-2)])   # rows (x) mirrored, swapped
    assert torch.equal(xs, x.flip(-2))
    xs, ys = augmentation.augment_batch(x, y, 28, np.random.default_rng(0),
                                        augmentation.Augment.slices(p_spatial=0, **still), None)
    assert torch.equal(ys, y) and torch.equal(xs, x)             # no flip unless asked for
    with pytest.raises(ValueError, match='swap_classes'):
        augmentation.augment_batch(x, y, 48, np.random.default_rng(0), aug, None)


# ------------------------------------------------------------------------------------ split

def test_split_is_by_participant():
    people = [f'{i:02d}' for i in range(10)] * 2          # two sessions each
    train, val = bt.split_participants(people, 0.3, seed=1)
    assert len(val) == 3 and len(train) == 7 and not set(train) & set(val)
    assert sorted(train + val) == sorted(set(people))
    assert bt.split_participants(people, 0.3, seed=1) == (train, val)
    assert bt.split_participants(people, 0.3, seed=2) != (train, val)
    assert [len(p) for p in bt.split_participants(['01', '02'], 0.01)] == [1, 1]
    assert bt.split_participants(['01', '02'], 0.0) == (['01', '02'], [])
    with pytest.raises(ValueError, match='at least 2 participants'):
        bt.split_participants(['01', '01'], 0.2)
    assert bt._case_name('cerebseg_sub_01_ses_a_wf') == ('sub-01_ses-a', '01')
    assert bt._case_name('cerebseg_sub_07_wf') == ('sub-07', '07')


def test_label_groups():
    groups = bt.label_groups(NAMES)
    assert groups == {'all': None, 'nuclei': [3, 4], 'gmwm': [1, 2]}


# --------------------------------------------------------------------------------- training

def test_a_few_steps_lower_the_loss():
    from cerebseg.models.nets2d import build_model

    cases = [synthetic_case(s) for s in range(2)]
    ds = bt.SliceDataset(cases, inf.Slicing(size=32, crop=32), margin=0)
    torch.manual_seed(0)
    model = build_model('ndeconet', 'resnet18', 1, len(NAMES), width=8)
    result = bt.train_brainstem(model, ds, [synthetic_case(5, participant='05')], labels=LABELS,
                                loss='dicece', alpha=0.5, steps=24, batch_size=8, lr=3e-3,
                                augment=None, val_every=6, patience=0)
    losses = [h['loss'] for h in result.history]
    assert len(losses) == 4 and result.steps == 24
    assert losses[-1] < 0.6 * losses[0], losses
    assert set(result.scores) == {'all', 'nuclei', 'gmwm'}
    assert result.history[-1]['miou_all'] > result.history[0]['miou_all']
    assert result.best_step in {h['step'] for h in result.history}


def test_cosine_schedule_ends_at_a_hundredth():
    from cerebseg.models.nets2d import build_model

    ds = bt.SliceDataset([synthetic_case(0)], inf.Slicing(size=32, crop=32), margin=0)
    model = build_model('ndeconet', 'resnet18', 1, len(NAMES), width=8, encoder_width=8)
    seen = []

    def on_evaluate(model, entry, improved):
        seen.append(entry['step'])

    real_adam = torch.optim.Adam
    opts = []

    def spy(*a, **kw):
        opts.append(real_adam(*a, **kw))
        return opts[-1]

    torch.optim.Adam = spy
    try:
        bt.train_brainstem(model, ds, labels=LABELS, steps=10, batch_size=4, lr=1e-2,
                           augment=None, val_every=5, lr_schedule='cosine',
                           on_evaluate=on_evaluate)
    finally:
        torch.optim.Adam = real_adam
    assert seen == [5, 10]
    assert opts[0].param_groups[0]['lr'] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        bt.train_brainstem(model, ds, labels=LABELS, steps=1, lr_schedule='step')


def test_early_stopping_keeps_the_best_weights():
    from cerebseg.models.nets2d import build_model

    ds = bt.SliceDataset([synthetic_case(0)], inf.Slicing(size=32, crop=32), margin=0)
    torch.manual_seed(0)
    model = build_model('ndeconet', 'resnet18', 1, len(NAMES), width=8)
    for m in model.modules():               # with lr 0 and frozen BatchNorm statistics the
        if isinstance(m, nn.BatchNorm2d):   # score never improves after the first validation
            m.momentum = 0.0
    result = bt.train_brainstem(model, ds, [synthetic_case(1, participant='02')], labels=LABELS,
                                steps=200, batch_size=4, lr=0.0, augment=None, val_every=1,
                                patience=2)
    assert result.stopped_early and result.steps == 3 and result.best_step == 1


# ----------------------------------------------------------------------- work folders + CLI

def write_work(root, labels, legacy=False):
    """A work folder with participant runs (brainstem box, atlas labels) where ``cerebseg``
    leaves them (:mod:`cerebseg.workflows.workdir`), or in the older layout without the
    command's top-level workflow (``legacy``)."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for i in labels:
        case = synthetic_case(int(i), participant=i)
        run = root / f'cerebseg_sub_{i}_wf' if legacy else workdir.run_folder(root, f'sub-{i}')
        for rel, data in ((workdir.BS_T1_BOX, case.t1),
                          (workdir.BS_DSEG_BOX, case.classes.astype(np.int16))):
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(run / rel))
    lut = root / 'seg-brainstem_dseg.tsv'
    lut.write_text('index\tname\n' + ''.join(f'{i}\t{n}\n' for i, n in LABELS))
    return lut


def test_find_and_load_cases(tmp_path, caplog):
    lut = write_work(tmp_path / 'w1', ['01', '02'])
    write_work(tmp_path / 'w2', ['02', '03'], legacy=True)
    (tmp_path / 'w2' / 'cerebseg_sub_04_wf').mkdir()           # a run without the brainstem
    with caplog.at_level('WARNING'):
        found = bt.find_cases([tmp_path / 'w1', tmp_path / 'w2'])
    assert [f[:2] for f in found] == [('sub-01', '01'), ('sub-02', '02'), ('sub-03', '03')]
    assert 'cerebseg_sub_04_wf has no' in caplog.text and 'the first is used' in caplog.text
    from cerebseg.utils.labels import read_lut

    case = bt.load_case(*found[0], read_lut(lut))
    assert case.t1.shape == SHAPE and case.classes.max() == 4
    with pytest.raises(ValueError, match='holds no participant run'):
        bt.find_cases([tmp_path / 'w2' / 'cerebseg_sub_04_wf'])
    with pytest.raises(ValueError, match='not in the lookup table'):
        bt.load_case(*found[0], LABELS[:3])


def test_cli_trains_and_writes_a_checkpoint(tmp_path):
    from cerebseg.bids_app.train import main
    from cerebseg.models.checkpoint import load_brainstem_net as load_model

    lut = write_work(tmp_path / 'work', ['01', '02', '03'])
    out = tmp_path / 'bs.pt'
    rc = main(['brainstem', '--work-dir', str(tmp_path / 'work'), '--lut', str(lut),
               '--out', str(out), '--decoder', 'ndeconet', '--encoder', 'resnet18',
               '--size', '32', '--crop', '32', '--context', '1', '--steps', '4',
               '--batch-size', '4', '--val-fraction', '0.34', '--val-every', '2',
               '--device', 'cpu', '--nthreads', '1', '--seed', '3'])
    assert rc == 0
    model, meta = load_model(out, decoder='ndeconet', channels=['T1w-1', 'T1w', 'T1w+1'])
    info = meta['meta']
    assert meta['labels'] == NAMES and info['steps'] == 4 and info['best_step'] in (2, 4)
    assert len(info['split']['validation']) == 1 and len(info['split']['train']) == 2
    assert not set(info['split']['train']) & set(info['split']['validation'])
    assert set(info['scores']) == {'all', 'nuclei', 'gmwm'}
    assert info['slicing'] == {'size': 32, 'context': 1, 'crop': 32, 'center': None}
    assert info['training']['loss'] == 'dicece' and info['training']['alpha'] == 0.1
    case = synthetic_case(9)
    probs = inf.predict_volume(model, case.t1, **info['slicing'])
    assert probs.shape == (len(NAMES),) + SHAPE
    # the checkpoint holds the weights of the best step: scored again on the held-out
    # participant, they give the validation scores it records
    from cerebseg.utils.labels import read_lut

    held_out = [bt.load_case(*found, read_lut(lut)) for found in bt.find_cases([tmp_path / 'work'])
                if found[1] in info['split']['validation']]
    assert len(held_out) == 1
    again = bt.score_cases(model, held_out, inf.Slicing(**info['slicing']), bt.label_groups(NAMES))
    assert set(again) == set(info['scores'])
    for key, value in info['scores'].items():
        assert again[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_cli_parser():
    from cerebseg.bids_app.train import _build_parser

    parser = _build_parser()
    opts = parser.parse_args(['brainstem', '--work-dir', 'a', 'b', '--out', 'x.pt',
                              '--decoder', 'unet', '--context', '1', '--size', '224',
                              '--steps', '5', '--val-fraction', '0.25',
                              '--participant-label', 'sub-01', '02'])
    assert [str(p) for p in opts.work_dir] == ['a', 'b'] and opts.bids is None
    assert (opts.decoder, opts.context, opts.size, opts.steps) == ('unet', 1, 224, 5)
    assert opts.participant_label == ['01', '02'] and opts.val_fraction == 0.25
    opts = parser.parse_args(['brainstem', '--bids', 'ds', '--out', 'x.pt'])
    assert (opts.loss, opts.alpha, opts.encoder, opts.epochs) == ('dicece', 0.1, 'resnet34', 20)
    for bad in (['--work-dir', 'a', '--bids', 'b'], [],
                ['--work-dir', 'a', '--val-fraction', '1'],
                ['--work-dir', 'a', '--decoder', 'segformer'],
                ['--work-dir', 'a', '--context', '9'],
                ['--work-dir', 'a', '--steps', '0']):
        with pytest.raises(SystemExit) as err:
            parser.parse_args(['brainstem', '--out', 'x.pt', *bad])
        assert err.value.code == 2


def test_importable_without_nipype():
    code = ('import sys, cerebseg.training.brainstem2d; '
            'sys.exit(any(m.startswith("nipype") for m in sys.modules))')
    assert subprocess.run([sys.executable, '-c', code], check=False).returncode == 0


def test_training_labels_already_made_are_not_made_again(tmp_path, monkeypatch):
    """``cerebseg-train brainstem --bids``: the participants whose runs in the work folder
    already hold the atlas labels are not run again (the check looked for them outside the
    command's top-level workflow folder, so every participant was run again)."""
    import argparse
    import subprocess

    from cerebseg.bids_app.train_brainstem import _brainstem_runs

    bids = tmp_path / 'bids'
    for p in ('01', '02', '03'):
        (bids / f'sub-{p}').mkdir(parents=True)
    write_work(tmp_path / 'prep' / 'work', ['01', '02'])
    launched = []
    monkeypatch.setattr(subprocess, 'run', lambda cmd, **kw: launched.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    opts = argparse.Namespace(bids=bids, prep_dir=tmp_path / 'prep', participant_label=[],
                              exclude_label=[], nthreads=1, device='cpu', assets_dir=None,
                              skip_bids_validation=True)
    assert _brainstem_runs(opts) == [tmp_path / 'prep' / 'work']
    assert len(launched) == 1
    assert launched[0][launched[0].index('--participant-label') + 1:][:2] == ['03', '--skip-cerebellum']
    launched.clear()
    opts.exclude_label = ['03']
    _brainstem_runs(opts)
    assert launched == []
