"""2D brainstem networks (N-DecoNet, U-DecoNet and the decoders they are compared with).

The N-DecoNet paper (Oh et al., ISBI 2024) segments 34 classes (background, brainstem white
matter, grey matter, 31 nuclei) on axial T1w slices in MNI space, cropped around the brainstem
and resized to 224x224, with a ResNet encoder; it compares its decoder with those of
segmentation-models-pytorch (smp) on the same ResNet-34. smp needs torchvision, which does not
work with the torch used here, so encoder and decoders are written in torch, with MONAI's ResNet
blocks and convolution blocks (the comparison decoders in :mod:`cerebseg.models.decoders2d`);
each decoder follows smp 0.3.3's default architecture (its layers, widths and upsampling modes;
differences are stated in the class docstrings).

Every model maps ``(N, C, H, W)`` input channels (T1w, optional T2w, optional neighbouring
slices for 2.5D) to ``(N, n_classes, H, W)`` logits; ``H`` and ``W`` must be multiples of
``model.divisor``: 32, except PSPNet (8), DeepLabV3 (8) and DeepLabV3+ (16), so multiples of 32
(224, 96, 64) suit every model.

Parameters with a ResNet-34 encoder, 34 classes and 1 input channel, measured, against the
paper's Table 1 (3 input channels add 6,272, the extra weights of the first convolution, 0.03 %):

==============  ==========  =====  =======  ================================================
decoder         measured    paper  diff.    note
==============  ==========  =====  =======  ================================================
ndeconet        21,493,330  21.5M  -0.03 %  common width 24, picked to match (16: 21.43 M,
                                            32: 21.56 M)
udeconet        21,493,330  --              the same layers as ndeconet
unet            24,434,882  24.4M  +0.14 %
unetplusplus    26,077,122  26.1M  -0.09 %
manet           31,782,146  31.8M  -0.06 %
pspnet           1,647,042  21.6M  -92.4 %  +19,936,768 unused in smp: 21,583,810, -0.07 %
fpn             23,153,378  23.2M  -0.20 %
deeplabv3       26,009,314  26.0M  +0.04 %
deeplabv3plus   22,439,666  22.4M  +0.18 %
==============  ==========  =====  =======  ================================================

PSPNet: smp's default PSPNet reads the stride-8 features (``encoder_depth=3``: stem, layer1,
layer2), but smp's ResNet encoder still holds ``layer3`` and ``layer4``, which never run; the
paper's 21.6 M counts them. Here the encoder stops where the decoder reads, so the network is
the same function with 19.9 M fewer (dead) parameters.

Input channels: 1 and 3 input channels round to the same figure of the table for every
decoder: they differ by 6,272 parameters, an eighth of the table's rounding (0.05 M), so the
table cannot tell which one the paper used (smp's default is 3, RGB; 3 is nearer the printed
figure for 5 decoders, 1 for 3, all within 0.2 %). cerebseg's default is 1 (T1w).

Checkpoints (:func:`cerebseg.models.checkpoint.save_brainstem_net`,
:func:`~cerebseg.models.checkpoint.load_brainstem_net`) record the decoder, encoder, channel
counts, input channel names and label names, and are loaded with ``weights_only=True``.
Imports torch and MONAI only (no nipype).
"""
from __future__ import annotations

import logging

import torch
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from cerebseg.models.decoders2d import (DeepLabV3Decoder, DeepLabV3PlusDecoder, FPNDecoder,
                                        MANetDecoder, PSPNetDecoder, UNetDecoder,
                                        UNetPlusPlusDecoder, conv_bn_relu, Decoder2D, upsample)
from cerebseg.models.nets3d import count_parameters

LOGGER = logging.getLogger(__name__)

#: encoder name -> (MONAI block, blocks per stage); stage widths 64-128-256-512 (x4 bottleneck)
ENCODERS = {'resnet18': (ResNetBlock, (2, 2, 2, 2)),
            'resnet34': (ResNetBlock, (3, 4, 6, 3)),
            'resnet50': (ResNetBottleneck, (3, 4, 6, 3))}

__all__ = ['DECODERS', 'ENCODERS', 'BrainstemNet', 'ResNetEncoder', 'build_model',
           'count_parameters']


# ---------------------------------------------------------------------------------- encoder

class ResNetEncoder(nn.Module):
    """ResNet-18/34/50 in torchvision's layout (same modules, same state-dict keys, no ``fc``).

    ``x: (N, in_channels, H, W) -> [f1, ..., f_depth]``: the stem (7x7 convolution, stride 2,
    BatchNorm, ReLU) at stride 2, then max-pool + ``layer1`` at 4, ``layer2`` at 8, ``layer3`` at
    16, ``layer4`` at 32 (:attr:`strides`, :attr:`out_channels`: 64, 64, 128, 256, 512; x4 for the
    last four with ResNet-50). ``width`` scales every stage (64 is torchvision's; cerebseg's
    default brainstem weights use 16, a sixteenth of the parameters, small enough to commit). ``depth`` < 5 builds only the first stages. ``output_stride`` 16 or
    8 replaces the strides of the last one or two stages by dilation (2, then 2 and 4), as smp
    does for DeepLab.

    Weights are random (torchvision's initialisation) unless ``weights`` is a torchvision state
    dict (read from a local file such as ``resnet34-b627a593.pth`` by
    :func:`cerebseg.models.checkpoint.load_encoder_state`; nothing is ever downloaded). Its
    ``fc`` and unbuilt stages are ignored; a 3-channel first convolution is adapted to
    ``in_channels`` as smp does (summed over RGB for 1 channel, otherwise repeated and rescaled).
    """

    def __init__(self, name: str = 'resnet34', in_channels: int = 1, depth: int = 5,
                 output_stride: int = 32, weights: dict | None = None, width: int = 64):
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f'unknown encoder {name!r}; choose one of {sorted(ENCODERS)}')
        if in_channels < 1 or not 1 <= depth <= 5 or output_stride not in (8, 16, 32) \
                or width < 1:
            raise ValueError(f'bad encoder settings: in_channels={in_channels} (>= 1), '
                             f'depth={depth} (1-5), output_stride={output_stride} (8, 16, 32), '
                             f'width={width} (>= 1)')
        if weights is not None and width != 64:
            raise ValueError(f'pretrained torchvision weights need width 64, not {width}')
        block, layers = ENCODERS[name]
        self.name, self.in_channels, self.depth, self.width = name, in_channels, depth, width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels, cin = [width], width
        for i, (planes, n) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), layers)):
            if i + 2 > depth:
                break
            stride = 1 if i == 0 else 2
            cout = planes * block.expansion
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                     nn.BatchNorm2d(cout))
            blocks = [block(cin, planes, spatial_dims=2, stride=stride, downsample=down)]
            blocks += [block(cout, planes, spatial_dims=2) for _ in range(n - 1)]
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
            channels.append(cout)
            cin = cout
        self.out_channels = tuple(channels)
        self.strides = tuple(min(2 ** (i + 1), output_stride) for i in range(depth))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for stage, dilation in ((3, 2 if output_stride == 8 else 1),
                                (4, {8: 4, 16: 2}.get(output_stride, 1))):
            if dilation > 1 and hasattr(self, f'layer{stage}'):
                _dilate(getattr(self, f'layer{stage}'), dilation)
        if weights is not None:
            self.load_pretrained(weights)

    @property
    def stages(self) -> list[nn.Module]:
        return [getattr(self, f'layer{i}') for i in range(1, self.depth)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        features = [x]
        x = self.maxpool(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def load_pretrained(self, state: dict) -> None:
        """Load a torchvision state dict (strict on the built stages; ValueError says what
        does not fit)."""
        state = dict(state)
        unbuilt = tuple(f'layer{i}.' for i in range(self.depth, 5)) + ('fc.',)
        state = {k: v for k, v in state.items() if not k.startswith(unbuilt)}
        conv = state.get('conv1.weight')
        if conv is not None and conv.ndim == 4 and conv.shape[1] == 3 != self.in_channels:
            state['conv1.weight'] = _adapt_first_conv(conv, self.in_channels)
            LOGGER.info('First convolution adapted from 3 to %d input channels',
                        self.in_channels)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f'{k} {tuple(state[k].shape)} != {tuple(v.shape)}' for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f'not torchvision {self.name} weights: missing keys '
                f'{missing[:5]}, unexpected keys {unexpected[:5]}, shape mismatches {shapes[:5]}'
                f'. Pass the file of a torchvision {self.name} or no weights.')
        self.load_state_dict(state, strict=True)
        LOGGER.info('%s encoder weights loaded', self.name)


def _dilate(stage: nn.Module, dilation: int) -> None:
    """Replace the stride of every convolution of ``stage`` by ``dilation`` (smp's
    ``replace_strides_with_dilation``)."""
    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size[0] > 1:
                m.dilation = (dilation, dilation)
                m.padding = tuple(k // 2 * dilation for k in m.kernel_size)


def _adapt_first_conv(weight: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return weight.sum(1, keepdim=True)
    return weight[:, [i % 3 for i in range(n)]] * (3 / n)


# -------------------------------------------------------------------------------- decoders

# N-DecoNet and U-DecoNet here; the comparison decoders in cerebseg.models.decoders2d

class NDecoNetDecoder(Decoder2D):
    """N-DecoNet: the stride-4 to stride-32 features each pass a 3x3 convolution (BatchNorm,
    ReLU) to ``width`` channels, are upsampled (bilinear) to stride 4 and summed; a 3x3 head and
    bilinear upsampling give the logits. ``width`` 24 matches the paper's 21.5 M parameters."""

    def __init__(self, encoder_channels, width: int = 24):
        super().__init__()
        if width < 1:
            raise ValueError(f'width must be >= 1, got {width}')
        self.lateral = nn.ModuleList(conv_bn_relu(c, width) for c in encoder_channels[-4:])
        self.out_channels = width

    def levels(self, features):
        return [conv(f) for conv, f in zip(self.lateral, features[-4:])]

    def forward(self, features):
        levels = self.levels(features)
        size = levels[0].shape[-2:]
        return sum(upsample(y, size) if y.shape[-2:] != size else y for y in levels)


class UDecoNetDecoder(NDecoNetDecoder):
    """U-DecoNet: N-DecoNet with a top-down path: from the coarsest level down, each level's
    output (after its convolution, where every level has ``width`` channels) also adds the
    upsampled output of the previous, coarser level, as U-Net's decoder carries the coarser
    level forward; the levels are then summed at stride 4 as in N-DecoNet. Same parameters."""

    def levels(self, features):
        levels = super().levels(features)
        for i in range(len(levels) - 2, -1, -1):
            levels[i] = levels[i] + upsample(levels[i + 1], levels[i].shape[-2:])
        return levels


#: decoder name -> class (the registry of :func:`build_model`)
DECODERS = {'ndeconet': NDecoNetDecoder, 'udeconet': UDecoNetDecoder, 'unet': UNetDecoder,
            'unetplusplus': UNetPlusPlusDecoder, 'manet': MANetDecoder, 'pspnet': PSPNetDecoder,
            'fpn': FPNDecoder, 'deeplabv3': DeepLabV3Decoder,
            'deeplabv3plus': DeepLabV3PlusDecoder}


# --------------------------------------------------------------------------------- model

class BrainstemNet(nn.Module):
    """Encoder + decoder + segmentation head: ``(N, C, H, W) -> (N, n_classes, H, W)`` logits.

    The head is one convolution (``decoder.head_kernel``) followed, where the decoder ends
    below full resolution, by bilinear upsampling to the input size (``align_corners=True``,
    as smp's ``UpsamplingBilinear2d``). Decoder convolutions start Kaiming-uniform, the head
    Xavier-uniform (smp's initialisation).
    """

    def __init__(self, encoder: ResNetEncoder, decoder: Decoder2D, n_classes: int,
                 config: dict | None = None):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f'n_classes must be >= 1, got {n_classes}')
        self.encoder = encoder
        self.decoder = decoder
        k = decoder.head_kernel
        self.head = nn.Conv2d(decoder.out_channels, n_classes, k, padding=k // 2)
        for m in decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode='fan_in', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.config = dict(config or {})

    @property
    def divisor(self) -> int:
        """Input sides must be multiples of this (the encoder's largest stride)."""
        return max(self.encoder.strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.encoder.in_channels:
            raise ValueError(f'expected (N, {self.encoder.in_channels}, H, W) input, got '
                             f'{tuple(x.shape)}')
        if x.shape[2] % self.divisor or x.shape[3] % self.divisor:
            raise ValueError(f'input sides {tuple(x.shape[2:])} must be multiples of '
                             f'{self.divisor}; pad or crop the slices (e.g. to 224x224)')
        y = self.head(self.decoder(self.encoder(x)))
        if y.shape[-2:] != x.shape[-2:]:
            y = upsample(y, x.shape[-2:], align_corners=True)
        return y


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def build_model(decoder: str, encoder: str = 'resnet34', in_channels: int = 1,
                n_classes: int = 34, encoder_state: dict | None = None,
                encoder_width: int = 64, **kw) -> BrainstemNet:
    """A registered decoder on a ResNet encoder; ``kw`` go to the decoder (e.g. ``width`` for
    N-DecoNet, ``decoder_channels`` for U-Net). ``encoder_state``: a torchvision state dict
    (:func:`cerebseg.models.checkpoint.load_encoder_state`; not recorded in the model's config: a checkpoint holds the trained weights);
    ``encoder_width``: the encoder's first stage width (64: torchvision's ResNets)."""
    try:
        cls = DECODERS[decoder]
    except KeyError:
        raise ValueError(f'unknown decoder {decoder!r}; choose one of {sorted(DECODERS)}') \
            from None
    depth, stride = cls.encoder_settings(**kw)
    enc = ResNetEncoder(encoder, in_channels, depth=depth, output_stride=stride,
                        weights=encoder_state, width=encoder_width)
    kw = {k: _plain(v) for k, v in kw.items()}
    config = {'decoder': decoder, 'encoder': encoder, 'in_channels': in_channels,
              'n_classes': n_classes, 'encoder_width': encoder_width, **kw}
    return BrainstemNet(enc, cls(enc.out_channels, **kw), n_classes, config)
