"""2D brainstem networks (N-DecoNet family), their checkpoints, losses and metric (tiny inputs)."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cerebseg.models import checkpoint as cpt
from cerebseg.models import nets2d as bs
from cerebseg.models.losses import (
    ALL_LOSSES,
    LOSSES,
    DiceCELoss,
    DiceLoss,
    SoftCELoss,
    build_loss,
)
from cerebseg.models.checkpoint import CheckpointError
from cerebseg.models.metrics import iou_counts, iou_from_counts, mean_iou, t_confidence_interval

#: the paper's Table 1 (ResNet-34, 224x224, 34 classes), in millions
PAPER = {'ndeconet': 21.5, 'unet': 24.4, 'unetplusplus': 26.1, 'manet': 31.8, 'pspnet': 21.6,
         'fpn': 23.2, 'deeplabv3': 26.0, 'deeplabv3plus': 22.4}
#: the counts in the module docstring (ResNet-34, 1 input channel, 34 classes)
MEASURED = {'ndeconet': 21_493_330, 'udeconet': 21_493_330, 'unet': 24_434_882,
            'unetplusplus': 26_077_122, 'manet': 31_782_146, 'pspnet': 1_647_042,
            'fpn': 23_153_378, 'deeplabv3': 26_009_314, 'deeplabv3plus': 22_439_666}



pytestmark = pytest.mark.usefixtures('one_torch_thread')


def test_registry_is_complete():
    assert sorted(bs.DECODERS) == sorted(MEASURED)
    with pytest.raises(ValueError, match='unknown decoder .*ndeconet'):
        bs.build_model('segformer')
    with pytest.raises(ValueError, match='unknown encoder'):
        bs.build_model('unet', encoder='resnet101')


@pytest.mark.parametrize('decoder', sorted(bs.DECODERS))
def test_forward_backward(decoder):
    torch.manual_seed(0)
    model = bs.build_model(decoder, 'resnet18', in_channels=1, n_classes=5)
    x = torch.randn(2, 1, 64, 64)
    y = model(x)
    assert y.shape == (2, 5, 64, 64)
    F.cross_entropy(y, torch.randint(0, 5, (2, 64, 64))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters without gradient: {missing[:5]}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())



def test_udeconet_adds_the_coarser_level():
    torch.manual_seed(0)
    n = bs.build_model('ndeconet', 'resnet18', in_channels=1, n_classes=3, width=8).eval()
    u = bs.build_model('udeconet', 'resnet18', in_channels=1, n_classes=3, width=8).eval()
    u.load_state_dict(n.state_dict())  # the same layers: only the wiring differs
    with torch.no_grad():
        feats = n.encoder(torch.randn(1, 1, 64, 64))
        plain, top_down = n.decoder.levels(feats), u.decoder.levels(feats)
    assert [y.shape[-1] for y in plain] == [16, 8, 4, 2]  # strides 4 to 32, width 8 each
    assert torch.equal(top_down[-1], plain[-1])
    for i in range(3):
        up = F.interpolate(top_down[i + 1], size=plain[i].shape[-2:], mode='bilinear')
        assert torch.allclose(top_down[i], plain[i] + up, atol=1e-6)
    assert not torch.allclose(n.decoder(feats), u.decoder(feats))

def test_input_checks_and_other_sizes():
    model = bs.build_model('ndeconet', 'resnet18', in_channels=3, n_classes=4, width=8).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 4, 96, 96)
        assert model(torch.randn(1, 3, 64, 128)).shape == (1, 4, 64, 128)
    with pytest.raises(ValueError, match='multiples of 32'):
        model(torch.randn(1, 3, 80, 64))
    with pytest.raises(ValueError, match=r'expected \(N, 3, H, W\)'):
        model(torch.randn(1, 1, 64, 64))
    assert bs.build_model('pspnet', 'resnet18').divisor == 8
    assert bs.build_model('deeplabv3plus', 'resnet18').divisor == 16


@pytest.mark.parametrize('decoder', sorted(bs.DECODERS))
def test_resnet34_parameter_counts(decoder):
    with torch.device('meta'):
        model = bs.build_model(decoder, 'resnet34', in_channels=1, n_classes=34)
        n = bs.count_parameters(model)
        assert n == MEASURED[decoder]
        if decoder == 'pspnet':  # smp keeps the encoder stages PSPNet does not read
            n += (bs.count_parameters(bs.ResNetEncoder('resnet34', 1))
                  - bs.count_parameters(model.encoder))
    if decoder in PAPER:
        assert abs(n / 1e6 / PAPER[decoder] - 1) < 0.05
    if decoder == 'ndeconet':  # the width is the one free choice; it was set to match
        assert round(n / 1e6, 1) == PAPER['ndeconet']


@pytest.mark.parametrize('name, n_params, n_keys', [('resnet18', 11_176_512, 120),
                                                    ('resnet34', 21_284_672, 216),
                                                    ('resnet50', 23_508_032, 318)])
def test_encoder_matches_torchvision_layout(name, n_params, n_keys):
    # torchvision's counts without fc (11,689,512 / 21,797,672 / 25,557,032 parameters and
    # 122 / 218 / 320 state-dict entries with it)
    with torch.device('meta'):
        enc = bs.ResNetEncoder(name, in_channels=3)
    keys = enc.state_dict().keys()
    assert bs.count_parameters(enc) == n_params
    assert len(keys) == n_keys
    assert {'conv1.weight', 'bn1.running_var', 'layer1.0.conv1.weight',
            'layer2.0.downsample.0.weight', 'layer2.0.downsample.1.num_batches_tracked',
            'layer4.1.bn2.bias'} <= set(keys)
    assert ('layer4.2.conv3.weight' in keys) == (name == 'resnet50')


@pytest.mark.parametrize('name, channels', [('resnet18', (64, 64, 128, 256, 512)),
                                            ('resnet50', (64, 256, 512, 1024, 2048))])
def test_encoder_features(name, channels):
    enc = bs.ResNetEncoder(name, in_channels=2).eval()
    assert enc.out_channels == channels and enc.strides == (2, 4, 8, 16, 32)
    with torch.no_grad():
        feats = enc(torch.randn(1, 2, 32, 64))
    assert [f.shape[1] for f in feats] == list(channels)
    assert [(32 // f.shape[-2], 64 // f.shape[-1]) for f in feats] == [(s, s) for s in enc.strides]
    for stride, strides in ((16, (2, 4, 8, 16, 16)), (8, (2, 4, 8, 8, 8))):
        enc = bs.ResNetEncoder('resnet18', 1, output_stride=stride).eval()
        with torch.no_grad():
            feats = enc(torch.randn(1, 1, 64, 64))
        assert enc.strides == strides == tuple(64 // f.shape[-1] for f in feats)
    enc = bs.ResNetEncoder('resnet18', 1, depth=3)
    assert enc.out_channels == (64, 64, 128) and not hasattr(enc, 'layer3')


def test_encoder_width_scales_every_stage(tmp_path):
    """Width 16: stages 16-16-32-64-128, a sixteenth of the convolution weights; recorded in
    the checkpoint and rebuilt from it; pretrained (width-64) weights refused."""
    enc = bs.ResNetEncoder('resnet34', 1, width=16)
    assert enc.out_channels == (16, 16, 32, 64, 128)
    full = bs.count_parameters(bs.ResNetEncoder('resnet34', 1))
    assert abs(bs.count_parameters(enc) / full - 1 / 16) < 0.01
    model = bs.build_model('ndeconet', 'resnet34', n_classes=5, encoder_width=16).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5, 64, 64)
    path = cpt.save_brainstem_net(tmp_path / 'small.pt', model,
                         {'channels': ['T1w'], 'labels': list('abcde')})
    loaded, info = cpt.load_brainstem_net(path)
    assert info['config']['encoder_width'] == 16
    half = cpt.save_brainstem_net(tmp_path / 'half.pt', model,
                         {'channels': ['T1w'], 'labels': list('abcde')}, half=True)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    small, _ = cpt.load_brainstem_net(half)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert next(small.parameters()).dtype == torch.float32
        torch.testing.assert_close(small(x), model(x), atol=0.05, rtol=0.05)
    assert loaded.encoder.out_channels == (16, 16, 32, 64, 128)
    with pytest.raises(ValueError, match='need width 64'):
        bs.ResNetEncoder('resnet18', 1, width=32, weights={})
    with pytest.raises(ValueError, match='width=0'):
        bs.ResNetEncoder('resnet18', 1, width=0)


def test_pretrained_weights(tmp_path):
    torch.manual_seed(0)
    rgb = bs.ResNetEncoder('resnet18', in_channels=3)
    state = dict(rgb.state_dict(), **{'fc.weight': torch.zeros(1000, 512),
                                      'fc.bias': torch.zeros(1000)})
    path = tmp_path / 'resnet18-f37072fd.pth'
    torch.save(state, path)
    loaded = cpt.load_encoder_state(path, 'resnet18')
    gray = bs.ResNetEncoder('resnet18', in_channels=1, weights=loaded)
    assert torch.allclose(gray.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(gray.layer3[1].conv2.weight, rgb.layer3[1].conv2.weight)
    five = bs.ResNetEncoder('resnet18', in_channels=5, weights=loaded)
    assert torch.allclose(five.conv1.weight[:, 3], rgb.conv1.weight[:, 0] * 3 / 5)
    model = bs.build_model('pspnet', 'resnet18', encoder_state=loaded)  # unbuilt stages ignored
    assert torch.equal(model.encoder.layer2[0].conv1.weight, rgb.layer2[0].conv1.weight)
    assert 'encoder_state' not in model.config
    with pytest.raises(ValueError, match='not torchvision resnet34'):
        bs.ResNetEncoder('resnet34', in_channels=3, weights=loaded)
    with pytest.raises(CheckpointError, match='not found: .*missing.pth'):
        cpt.load_encoder_state(tmp_path / 'missing.pth', 'resnet18')


def test_checkpoint_round_trip_and_refusal(tmp_path):
    torch.manual_seed(0)
    model = bs.build_model('udeconet', 'resnet18', in_channels=2, n_classes=3, width=8).eval()
    meta = {'channels': ['T1w', 'T2w'], 'labels': ['background', 'WM', 'GM'], 'epochs': 3}
    path = cpt.save_brainstem_net(tmp_path / 'net.pt', model, meta)
    loaded, info = cpt.load_brainstem_net(path, decoder='udeconet', encoder='resnet18',
                                 channels=['T1w', 'T2w'])
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert info['config'] == {'decoder': 'udeconet', 'encoder': 'resnet18', 'in_channels': 2,
                              'n_classes': 3, 'encoder_width': 64, 'width': 8}
    assert info['labels'] == meta['labels'] and info['meta'] == {'epochs': 3}
    with pytest.raises(CheckpointError, match=r'net\.pt is a udeconet/resnet18 network'):
        cpt.load_brainstem_net(path, decoder='unet')
    with pytest.raises(CheckpointError, match=r'net\.pt is a udeconet/resnet18 .*resnet34'):
        cpt.load_brainstem_net(path, encoder='resnet34')
    with pytest.raises(CheckpointError, match=r'net\.pt was trained on the input channels'):
        cpt.load_brainstem_net(path, channels=['T1w'])
    ckpt = torch.load(path, weights_only=True)
    ckpt['config']['width'] = 16  # weights of another architecture than the declared one
    torch.save(ckpt, tmp_path / 'bad.pt')
    with pytest.raises(CheckpointError, match=r'bad\.pt: the weights do not fit'):
        cpt.load_brainstem_net(tmp_path / 'bad.pt')
    torch.save({'format': 'cerebseg-segmentation'}, tmp_path / 'unet3d.pt')
    with pytest.raises(CheckpointError, match=r'unet3d\.pt is not a cerebseg 2D brainstem'):
        cpt.load_brainstem_net(tmp_path / 'unet3d.pt')
    with pytest.raises(ValueError, match='name the 3 classes'):
        cpt.save_brainstem_net(tmp_path / 'x.pt', model, {'channels': ['T1w', 'T2w'], 'labels': ['bg']})
    with pytest.raises(ValueError, match='name the 2 input channels'):
        cpt.save_brainstem_net(tmp_path / 'x.pt', model, {'channels': ['T1w'], 'labels': list('abc')})


def test_importable_without_nipype():
    """The networks and losses load in a fresh interpreter without nipype."""
    import subprocess

    code = ('import sys, cerebseg.models.nets2d, cerebseg.models.losses; '
            'sys.exit(any(m.startswith("nipype") for m in sys.modules))')
    assert subprocess.run([sys.executable, '-c', code], check=False).returncode == 0


# ------------------------------------------------------------------------------- losses

def _predictions(n_classes=4):
    torch.manual_seed(0)
    target = torch.randint(0, n_classes, (2, 8, 8))
    onehot = F.one_hot(target, n_classes).movedim(-1, 1).float()
    wrong = F.one_hot((target + 1) % n_classes, n_classes).movedim(-1, 1).float()
    return target, 20 * onehot, 20 * wrong, onehot


@pytest.mark.parametrize('name', sorted(set(ALL_LOSSES) - {'deepceres'}))
def test_losses_vanish_for_perfect_predictions(name):
    target, perfect, wrong, _ = _predictions()
    loss = build_loss(name, smoothing=0.0) if name == 'softce' else build_loss(name)
    assert float(loss(perfect, target)) < 1e-3
    assert float(loss(wrong, target)) > 0.5
    assert float(loss(torch.zeros_like(perfect), target)) > float(loss(perfect, target))
    assert float(loss(perfect.double(), target)) == pytest.approx(float(loss(perfect, target)))


def test_soft_ce_minimum_is_the_smoothed_target():
    target, perfect, wrong, onehot = _predictions()
    eps = 0.1
    q = onehot * (1 - eps) + eps / 4
    entropy = float(-(q * q.log()).sum(1).mean())
    loss = SoftCELoss(eps)
    assert float(loss(q.log(), target)) == pytest.approx(entropy, rel=1e-5)
    assert float(loss(perfect, target)) > entropy  # over-confident: smoothing penalises it
    assert float(loss(wrong, target)) > float(loss(perfect, target))
    with pytest.raises(ValueError, match='smoothing'):
        SoftCELoss(1.5)


def test_dice_ce_alpha_weights_the_dice_side():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    dice = float(DiceLoss()(logits, target))
    ce = float(F.cross_entropy(logits, target))
    assert dice != pytest.approx(ce, rel=0.05)  # otherwise alpha could not be told apart
    for alpha in (0.0, 0.1, 0.5, 1.0):
        value = float(build_loss('dicece', alpha=alpha)(logits, target))
        assert value == pytest.approx(alpha * dice + (1 - alpha) * ce, rel=1e-5)
    assert float(DiceCELoss()(logits, target)) == pytest.approx(dice + ce, rel=1e-5)
    with pytest.raises(ValueError, match='alpha'):
        DiceCELoss(alpha=1.2)
    assert sorted(LOSSES) == ['ce', 'deepceres', 'dicece']  # 3D CLI choices
    assert LOSSES['dicece'] is DiceCELoss
    # ce: plain cross-entropy (no smoothing), the Dice of classes a patch lacks left out
    assert float(LOSSES['ce']()(logits, target)) == pytest.approx(ce, rel=1e-6)
    with pytest.raises(ValueError, match='unknown loss'):
        build_loss('lovasz')


# ------------------------------------------------------------------------------- metric

def test_mean_iou_by_hand():
    ref = np.array([[0, 0, 1, 1], [2, 2, 0, 0]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 3]])
    # IoU: class 0: 2/5, class 1: 2/3, class 2: 1/2, class 3: 0/1, class 4: absent (skipped)
    assert mean_iou(pred, ref, 5) == pytest.approx((0.4 + 2 / 3 + 0.5 + 0) / 4)
    assert mean_iou(pred, ref, 5, labels=[1, 2]) == pytest.approx((2 / 3 + 0.5) / 2)
    assert mean_iou(pred, ref, 5, labels=[1, 4]) == pytest.approx(2 / 3)
    assert math.isnan(mean_iou(pred, ref, 5, labels=[4]))
    assert mean_iou(torch.as_tensor(pred), torch.as_tensor(ref), 5) == pytest.approx(0.391667,
                                                                                     abs=1e-6)
    # pooled over slices: counts of the two rows add up to those of the whole
    parts = [iou_counts(pred[i], ref[i], 5) for i in range(2)]
    inter, union = (sum(p[k] for p in parts) for k in range(2))
    assert iou_from_counts(inter, union) == pytest.approx(mean_iou(pred, ref, 5))
    assert mean_iou(ref, ref, 5) == 1.0
    with pytest.raises(ValueError, match=r'outside \[0, 3\)'):
        mean_iou(pred, ref, 3)
    with pytest.raises(ValueError, match='differ in shape'):
        mean_iou(pred, ref[:1], 5)


def test_t_confidence_interval():
    mean, low, high = t_confidence_interval([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * s / sqrt(n)
    assert mean == 3 and low == pytest.approx(3 - half) and high == pytest.approx(3 + half)
    _, low0, high0 = t_confidence_interval([0.8, 0.8, 0.8])
    assert low0 == pytest.approx(0.8) and high0 == pytest.approx(0.8)
    _, low90, high90 = t_confidence_interval([1, 2, 3, 4, 5], level=0.90)
    assert low < low90 < high90 < high
    with pytest.raises(ValueError, match='at least 2'):
        t_confidence_interval([0.7])
