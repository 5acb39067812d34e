"""2D decoders that N-DecoNet is compared with (U-Net, U-Net++, MA-Net, PSPNet, FPN, DeepLabV3,
DeepLabV3+), and the blocks every 2D brainstem decoder shares.

Each follows segmentation-models-pytorch 0.3.3's default architecture (its layers, widths and
upsampling modes), written in torch with MONAI convolution blocks: smp needs torchvision, which
does not run with the torch used here. The registry, the encoder and N-DecoNet itself are in
:mod:`cerebseg.models.nets2d`; the parameter counts against the paper's Table 1 are in its
docstring. Imports torch and MONAI only (no nipype).
"""
from __future__ import annotations

import math

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn import functional as F


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1,
                 norm: bool = True) -> nn.Module:
    """Convolution (no bias when normalised), BatchNorm, ReLU (MONAI ``Convolution``)."""
    return Convolution(2, cin, cout, kernel_size=kernel, dilation=dilation, act='RELU',
                       norm='BATCH' if norm else None, bias=not norm)


def upsample(x: torch.Tensor, size=None, scale: int | None = None, mode: str = 'bilinear',
        align_corners: bool | None = None) -> torch.Tensor:
    if mode == 'nearest':
        align_corners = None
    elif align_corners is None:
        align_corners = False
    return F.interpolate(x, size=size, scale_factor=scale, mode=mode, align_corners=align_corners)


class Decoder2D(nn.Module):
    """Base: ``forward(features)`` -> ``(N, out_channels, H/s, W/s)``; the class says which
    encoder it needs and the kernel of the segmentation head."""

    encoder_depth = 5
    output_stride = 32
    head_kernel = 3

    @classmethod
    def encoder_settings(cls, **kw) -> tuple[int, int]:
        return cls.encoder_depth, cls.output_stride


class _UNetBlock(nn.Module):
    """Nearest x2 upsampling, concatenation with the skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.conv1 = conv_bn_relu(cin + skip, cout)
        self.conv2 = conv_bn_relu(cout, cout)

    def forward(self, x, skip=None):
        x = upsample(x, scale=2, mode='nearest')
        if skip is not None:
            x = torch.cat([x, skip], 1)
        return self.conv2(self.conv1(x))


def _unet_channels(encoder_channels, decoder_channels):
    """Input, skip and output widths of the U-Net-like decoders, coarsest block first."""
    enc = list(encoder_channels)[::-1]
    if len(decoder_channels) != len(enc):
        raise ValueError(f'{len(enc)} decoder widths needed, got {list(decoder_channels)}')
    return [enc[0]] + list(decoder_channels[:-1]), enc[1:] + [0], list(decoder_channels)


class UNetDecoder(Decoder2D):
    """U-Net (smp ``Unet``): five blocks from stride 32 to 1, each upsampling x2 (nearest),
    concatenating the encoder features of its stride and applying two 3x3 conv-BN-ReLU;
    widths 256-128-64-32-16, 3x3 head."""

    def __init__(self, encoder_channels, decoder_channels=(256, 128, 64, 32, 16)):
        super().__init__()
        cins, skips, couts = _unet_channels(encoder_channels, decoder_channels)
        self.blocks = nn.ModuleList(_UNetBlock(*c) for c in zip(cins, skips, couts))
        self.out_channels = couts[-1]

    def forward(self, features):
        skips = features[::-1][1:]
        x = features[-1]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


class UNetPlusPlusDecoder(Decoder2D):
    """U-Net++ (smp ``UnetPlusPlus``): nested dense skip pathways; node ``x_d_l`` upsamples
    node ``x_d_(l-1)`` (or the encoder features) and concatenates all nodes ``x_k_l`` (k > d) of
    its column with the encoder features; same blocks and widths as U-Net, 3x3 head."""

    def __init__(self, encoder_channels, decoder_channels=(256, 128, 64, 32, 16)):
        super().__init__()
        cins, skips, couts = _unet_channels(encoder_channels, decoder_channels)
        self.depth = len(cins) - 1
        blocks = {}
        for layer in range(self.depth):
            for d in range(layer + 1):
                if d == 0:
                    cin, skip, cout = cins[layer], skips[layer] * (layer + 1), couts[layer]
                else:
                    cin, skip = skips[layer - 1], skips[layer] * (layer + 1 - d)
                    cout = skips[layer]
                blocks[f'x_{d}_{layer}'] = _UNetBlock(cin, skip, cout)
        blocks[f'x_0_{self.depth}'] = _UNetBlock(cins[-1], 0, couts[-1])
        self.blocks = nn.ModuleDict(blocks)
        self.out_channels = couts[-1]

    def forward(self, features):
        f = features[::-1]
        x = {}
        for layer in range(self.depth):
            for d in range(self.depth - layer):
                if layer == 0:
                    x[f'x_{d}_{d}'] = self.blocks[f'x_{d}_{d}'](f[d], f[d + 1])
                else:
                    col = d + layer
                    cat = [x[f'x_{k}_{col}'] for k in range(d + 1, col + 1)] + [f[col + 1]]
                    x[f'x_{d}_{col}'] = self.blocks[f'x_{d}_{col}'](x[f'x_{d}_{col - 1}'],
                                                                    torch.cat(cat, 1))
        return self.blocks[f'x_0_{self.depth}'](x[f'x_0_{self.depth - 1}'])


class _PAB(nn.Module):
    """MA-Net's position-wise attention block on the stride-32 features."""

    def __init__(self, channels: int, pab_channels: int = 64):
        super().__init__()
        self.top_conv = nn.Conv2d(channels, pab_channels, 1)
        self.center_conv = nn.Conv2d(channels, pab_channels, 1)
        self.bottom_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.out_conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        n, c, h, w = x.shape
        query = self.center_conv(x).flatten(2).transpose(1, 2)           # (N, HW, P)
        key = self.top_conv(x).flatten(2)                                 # (N, P, HW)
        value = self.bottom_conv(x).flatten(2).transpose(1, 2)            # (N, HW, C)
        attention = torch.softmax(query @ key, -1)                        # (N, HW, HW)
        out = (attention @ value).transpose(1, 2).reshape(n, c, h, w)
        return self.out_conv(x + out)


class _SE(nn.Sequential):
    def __init__(self, channels: int, reduction: int = 16):
        reduced = max(1, channels // reduction)
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, reduced, 1),
                         nn.ReLU(inplace=True), nn.Conv2d(reduced, channels, 1), nn.Sigmoid())


class _MFAB(nn.Module):
    """MA-Net's multi-scale fusion attention block: the coarse features (3x3 then 1x1 conv to the
    skip width, x2 nearest) are reweighted by the sum of two squeeze-excitation gates (theirs and
    the skip's), concatenated with the skip, then two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, skip: int, cout: int, reduction: int = 16):
        super().__init__()
        self.hl_conv = nn.Sequential(conv_bn_relu(cin, cin), conv_bn_relu(cin, skip, 1))
        self.se_hl = _SE(skip, reduction)
        self.se_ll = _SE(skip, reduction)
        self.conv1 = conv_bn_relu(2 * skip, cout)
        self.conv2 = conv_bn_relu(cout, cout)

    def forward(self, x, skip):
        x = upsample(self.hl_conv(x), scale=2, mode='nearest')
        x = x * (self.se_hl(x) + self.se_ll(skip))
        return self.conv2(self.conv1(torch.cat([x, skip], 1)))


class MANetDecoder(Decoder2D):
    """MA-Net (smp ``MAnet``): a position-wise attention block (64 channels) on the stride-32
    features, then U-Net's five upsampling levels (widths 256-128-64-32-16) with multi-scale
    fusion attention blocks where there is a skip; 3x3 head. Two departures from smp 0.3.3,
    neither changing the parameters: the attention softmax runs over each query's keys (smp
    normalises over all HW x HW pairs at once) and the attended values are transposed back to
    (C, H, W) before reshaping (smp reshapes the (HW, C) matrix directly, mixing channels and
    positions)."""

    def __init__(self, encoder_channels, decoder_channels=(256, 128, 64, 32, 16),
                 pab_channels: int = 64, reduction: int = 16):
        super().__init__()
        cins, skips, couts = _unet_channels(encoder_channels, decoder_channels)
        self.center = _PAB(cins[0], pab_channels)
        self.blocks = nn.ModuleList(
            _MFAB(cin, skip, cout, reduction) if skip else _UNetBlock(cin, 0, cout)
            for cin, skip, cout in zip(cins, skips, couts))
        self.out_channels = couts[-1]

    def forward(self, features):
        skips = features[::-1][1:]
        x = self.center(features[-1])
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i]) if i < len(skips) else block(x)
        return x


class PSPNetDecoder(Decoder2D):
    """PSPNet (smp ``PSPNet``): on the stride-8 features (encoder depth 3), average pooling to
    1, 2, 3, 6 bins, a 1x1 conv-BN-ReLU to a quarter of the channels each (no BatchNorm on the
    1x1 bin), bilinear upsampling, concatenation with the features, a 1x1 conv-BN-ReLU to
    ``psp_channels`` (512), Dropout2d 0.2; 3x3 head, x8 bilinear."""

    encoder_depth = 3

    def __init__(self, encoder_channels, psp_channels: int = 512, dropout: float = 0.2,
                 bins=(1, 2, 3, 6)):
        super().__init__()
        cin = encoder_channels[-1]
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(conv_bn_relu(cin, cin // len(bins), 1, norm=b != 1)
                                      for b in bins)
        self.conv = conv_bn_relu(cin + len(bins) * (cin // len(bins)), psp_channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.out_channels = psp_channels

    def forward(self, features):
        x = features[-1]
        pooled = [upsample(branch(F.adaptive_avg_pool2d(x, b)), x.shape[-2:], align_corners=True)
                  for branch, b in zip(self.branches, self.bins)]
        return self.dropout(self.conv(torch.cat(pooled + [x], 1)))


class _GNBlock(nn.Sequential):
    """3x3 convolution (no bias), GroupNorm (32 groups, fewer if they do not divide), ReLU, then x2 bilinear if ``upsample``."""

    def __init__(self, cin: int, cout: int, upsample: bool):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.GroupNorm(math.gcd(32, cout), cout), nn.ReLU(inplace=True))
        self.upsample = upsample

    def forward(self, x):
        x = super().forward(x)
        return upsample(x, scale=2, align_corners=True) if self.upsample else x


class FPNDecoder(Decoder2D):
    """FPN (smp ``FPN``): 1x1 lateral convolutions to 256 channels on the stride-4 to 32
    features, top-down sum with x2 nearest upsampling, then per level 3x3 conv-GroupNorm-ReLU
    blocks to 128 channels upsampled (bilinear) to stride 4, summed, Dropout2d 0.2; 1x1 head,
    x4 bilinear."""

    head_kernel = 1

    def __init__(self, encoder_channels, pyramid_channels: int = 256,
                 segmentation_channels: int = 128, dropout: float = 0.2):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, pyramid_channels, 1)
                                     for c in encoder_channels[-4:][::-1])
        self.seg_blocks = nn.ModuleList(
            nn.Sequential(*[_GNBlock(pyramid_channels if i == 0 else segmentation_channels,
                                     segmentation_channels, bool(n)) for i in range(max(n, 1))])
            for n in (3, 2, 1, 0))
        self.dropout = nn.Dropout2d(dropout)
        self.out_channels = segmentation_channels

    def forward(self, features):
        c = features[-4:][::-1]
        p = [self.lateral[0](c[0])]
        for conv, skip in zip(self.lateral[1:], c[1:]):
            p.append(upsample(p[-1], scale=2, mode='nearest') + conv(skip))
        return self.dropout(sum(block(x) for block, x in zip(self.seg_blocks, p)))


class _SeparableConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, dilation: int = 1, bias: bool = False):
        super().__init__(nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin,
                                   bias=False),
                         nn.Conv2d(cin, cout, 1, bias=bias))


class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three 3x3 branches dilated by ``rates``
    (depthwise-separable if ``separable``), a global-pooling branch, each BN-ReLU, then a 1x1
    projection (BN, ReLU, Dropout 0.5)."""

    def __init__(self, cin: int, cout: int, rates=(12, 24, 36), separable: bool = False):
        super().__init__()

        def atrous(rate):
            conv = (_SeparableConv(cin, cout, rate) if separable else
                    nn.Conv2d(cin, cout, 3, padding=rate, dilation=rate, bias=False))
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())

        self.convs = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())]
            + [atrous(r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d((len(rates) + 2) * cout, cout, 1, bias=False),
                                     nn.BatchNorm2d(cout), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x):
        out = [conv(x) for conv in self.convs]
        out.append(upsample(self.pool(x), x.shape[-2:], align_corners=False))
        return self.project(torch.cat(out, 1))


class DeepLabV3Decoder(Decoder2D):
    """DeepLabV3 (smp ``DeepLabV3``): the encoder is dilated to output stride 8; ASPP (256
    channels, rates 12-24-36) on the last features, a 3x3 conv-BN-ReLU; 1x1 head, x8 bilinear."""

    output_stride = 8
    head_kernel = 1

    def __init__(self, encoder_channels, channels: int = 256, atrous_rates=(12, 24, 36)):
        super().__init__()
        self.aspp = _ASPP(encoder_channels[-1], channels, tuple(atrous_rates))
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.out_channels = channels

    def forward(self, features):
        return self.conv(self.aspp(features[-1]))


class DeepLabV3PlusDecoder(Decoder2D):
    """DeepLabV3+ (smp ``DeepLabV3Plus``): encoder dilated to ``output_stride`` 16 (or 8);
    separable ASPP (256 channels) and a separable 3x3 conv-BN-ReLU on the last features,
    upsampled (bilinear) to stride 4, concatenated with the stride-4 features reduced to 48
    channels (1x1 conv-BN-ReLU), a separable 3x3 conv-BN-ReLU; 1x1 head, x4 bilinear."""

    head_kernel = 1

    @classmethod
    def encoder_settings(cls, **kw):
        return 5, kw.get('output_stride', 16)

    def __init__(self, encoder_channels, channels: int = 256, atrous_rates=(12, 24, 36),
                 output_stride: int = 16):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f'DeepLabV3+ output_stride must be 8 or 16, got {output_stride}')
        self.aspp = nn.Sequential(_ASPP(encoder_channels[-1], channels, tuple(atrous_rates),
                                        separable=True),
                                  _SeparableConv(channels, channels), nn.BatchNorm2d(channels),
                                  nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(encoder_channels[-4], 48, 1, bias=False),
                                    nn.BatchNorm2d(48), nn.ReLU())
        self.block2 = nn.Sequential(_SeparableConv(48 + channels, channels),
                                    nn.BatchNorm2d(channels), nn.ReLU())
        self.out_channels = channels

    def forward(self, features):
        high = self.block1(features[-4])
        x = upsample(self.aspp(features[-1]), high.shape[-2:], align_corners=True)
        return self.block2(torch.cat([x, high], 1))
