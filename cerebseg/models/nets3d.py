"""DeepCeres segmentation networks (3D U-Net, Deep Pyramidal Network) and their registry.

Both nets map ``(N, C, X, Y, Z)`` input channels to ``(N, L, X, Y, Z)`` class logits. The input
channels are named (:data:`CHANNELS`): ``T1w``, ``T2w`` (optional) and ``prior`` (optional; the
multi-atlas prior, one channel per foreground class of the stage). A checkpoint records them,
and :func:`cerebseg.models.checkpoint.load_cascade_net` refuses a checkpoint whose inputs
differ from the ones asked for.

* :class:`UNet3D`: encoder-decoder with skip connections, two 3x3x3 convolutions (instance norm,
  leaky ReLU) per level, strided-convolution downsampling, transposed-convolution upsampling.
* With ``prior_channels`` (the default when the prior is an input), the prior's
  log-probabilities are also added to the logits and the output layer starts at zero: an
  untrained network returns the prior, and training learns corrections to it. This is
  cerebseg's addition to DeepCeres (where the prior is an input channel only); it makes short
  trainings start from the prior's accuracy instead of from chance.
* :class:`DPN3D`: the Deep Pyramidal Network of DeepCeres. There is no learned encoder: the
  input is average-pooled to 1/2, 1/4 and 1/8 resolution; the decoder starts at 1/8 and refines
  coarse to fine, each level seeing the upsampled features of the coarser one and the pooled
  input at its own resolution. It has about a fifth of the U-Net's parameters and keeps no
  full-resolution encoder activations.

Default widths give, for T1w+T2w+prior inputs (36 channels) and the 35 SUIT classes, 3,406,891
(U-Net) and 693,883 (DPN) parameters; the paper reports 3,433,473 and 696,177.

Imports torch only (no nipype), so the nets can be used on their own.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F


LOGGER = logging.getLogger(__name__)

#: input channel names, in the order they are stacked (``prior`` expands to several channels)
CHANNELS = ('T1w', 'T2w', 'prior')


#: inference on the CPU runs the convolutions of inputs with at least this many voxels (the
#: full-resolution levels) slab by slab, ``SLAB`` output planes along the first spatial axis at a
#: time: the same arithmetic for each voxel, without oneDNN's full-size copies of a layer's
#: input and output (for a 0.5 mm lobule box, about 1 GB each) nor the full-size concatenation
#: of a decoder level's inputs. ``LEAN = False`` turns it off. (The other in-place inference
#: steps, the prior residual, the softmax and the ensemble, work in slabs of the same size.)
LEAN = True
LEAN_MIN_VOXELS = 2 ** 21
SLAB = 16


def _lean(x: torch.Tensor) -> bool:
    return (LEAN and not torch.is_grad_enabled() and x.device.type == 'cpu'
            and x.dtype == torch.float32 and x[0, 0].numel() >= LEAN_MIN_VOXELS)


def conv_slabs(conv: nn.Conv3d, inputs: list) -> torch.Tensor:
    """``conv(torch.cat(inputs, 1))``, computed slab by slab along the first spatial axis
    (each slab with the input planes its kernel reaches, zeros beyond the volume as the
    convolution's own padding)."""
    (k, _, _), (s, s1, s2), (p, p1, p2) = conv.kernel_size, conv.stride, conv.padding
    if conv.dilation != (1, 1, 1) or conv.groups != 1 or conv.padding_mode != 'zeros':
        return conv(torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0])
    n, size = inputs[0].shape[0], inputs[0].shape[2:]
    out_size = [(d + 2 * pd - kd) // sd + 1
                for d, pd, kd, sd in zip(size, conv.padding, conv.kernel_size, conv.stride)]
    out = torch.empty((n, conv.out_channels, *out_size), dtype=inputs[0].dtype)
    for a in range(0, out_size[0], SLAB):
        b = min(a + SLAB, out_size[0])
        lo, hi = a * s - p, (b - 1) * s - p + k
        parts = [t[:, :, max(lo, 0):min(hi, size[0])] for t in inputs]
        piece = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        if lo < 0 or hi > size[0]:
            piece = F.pad(piece, (0, 0, 0, 0, max(-lo, 0), max(hi - size[0], 0)))
        out[:, :, a:b] = F.conv3d(piece, conv.weight, conv.bias, (s, s1, s2), (0, p1, p2))
    return out


def run_block(block: nn.Sequential, inputs: list) -> torch.Tensor:
    """``block(torch.cat(inputs, 1))``; its convolutions by :func:`conv_slabs` where the input
    is large (inference on the CPU). ``inputs`` is emptied: a tensor the caller holds nowhere
    else is freed as soon as the block no longer needs it."""
    parts = list(inputs)
    inputs.clear()
    if not _lean(parts[0]):
        x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        del parts
        return block(x)
    x = parts
    del parts
    for module in block:
        if isinstance(module, nn.Conv3d):
            x = conv_slabs(module, x if isinstance(x, list) else [x])
        else:
            x = module(x)
    return x


def _conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
        nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1),
        nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, inplace=True))


class _PriorResidual(nn.Module):
    """Adds the prior's log-probabilities to the logits (``prior_channels`` > 0).

    The prior's foreground probabilities are the last ``prior_channels`` input channels; the
    background gets one minus their sum. The head starts at zero, so an untrained network
    returns the prior itself and training learns corrections to it.
    """

    def __init__(self, prior_channels: int, out_channels: int, eps: float = 1e-3):
        super().__init__()
        if prior_channels and prior_channels + 1 != out_channels:
            raise ValueError(f'a prior of {prior_channels} foreground classes cannot be added '
                             f'to {out_channels} outputs')
        self.prior_channels = prior_channels
        self.eps = eps

    def zero_head(self, head: nn.Conv3d) -> None:
        if self.prior_channels:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.prior_channels:
            return logits
        if logits.requires_grad or logits.dtype != torch.float32:   # training, autocast
            return logits + self._log_prior(x)
        # inference: added in place, slab by slab along the first spatial axis (the whole
        # log-prior is as large as the logits, and its making needs three such tensors)
        for start in range(0, logits.shape[2], SLAB):
            logits[:, :, start:start + SLAB] += self._log_prior(x[:, :, start:start + SLAB])
        return logits

    def _log_prior(self, x: torch.Tensor) -> torch.Tensor:
        fg = x[:, -self.prior_channels:].float().clamp(0, 1)
        bg = (1 - fg.sum(1, keepdim=True)).clamp_min(0)
        return torch.log(torch.cat([bg, fg], 1) + self.eps)


class UNet3D(nn.Module):
    """3D U-Net; ``features`` per level, the last one is the bottleneck (input sides must be
    multiples of ``2 ** (len(features) - 1)``)."""

    def __init__(self, in_channels: int, out_channels: int,
                 features: tuple[int, ...] = (16, 32, 64, 120, 120), prior_channels: int = 0):
        super().__init__()
        self.config = {'in_channels': in_channels, 'out_channels': out_channels,
                       'features': list(features), 'prior_channels': prior_channels}
        self.down = nn.ModuleList()
        cin = in_channels
        for i, f in enumerate(features):
            self.down.append(_conv_block(cin, f, stride=1 if i == 0 else 2))
            cin = f
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for f in reversed(features[:-1]):
            self.up.append(nn.ConvTranspose3d(cin, f, 2, stride=2))
            self.dec.append(_conv_block(2 * f, f))
            cin = f
        self.head = nn.Conv3d(cin, out_channels, 1)
        self.prior = _PriorResidual(prior_channels, out_channels)
        self.prior.zero_head(self.head)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.down) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each activation is dropped once used (the skips as their level is decoded): at
        # inference the full-resolution ones are hundreds of MB each
        inp, skips = x, []
        for block in self.down:
            x = run_block(block, [x])
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = run_block(dec, [up(x), skips.pop()])
        logits = run_block(nn.Sequential(self.head), [x])
        del x
        return self.prior(logits, inp)


class DPN3D(nn.Module):
    """Deep Pyramidal Network: pooled-input pyramid, coarse-to-fine decoder.

    ``features`` are the decoder widths from the coarsest level (1/2**(len-1)) to full
    resolution.
    """

    def __init__(self, in_channels: int, out_channels: int,
                 features: tuple[int, ...] = (88, 56, 32, 16), prior_channels: int = 0):
        super().__init__()
        self.config = {'in_channels': in_channels, 'out_channels': out_channels,
                       'features': list(features), 'prior_channels': prior_channels}
        self.levels = len(features)
        self.blocks = nn.ModuleList()
        self.up = nn.ModuleList()
        cprev = 0
        for i, f in enumerate(features):
            if i:
                self.up.append(nn.ConvTranspose3d(cprev, f, 2, stride=2))
            self.blocks.append(_conv_block(in_channels + (f if i else 0), f))
            cprev = f
        self.head = nn.Conv3d(cprev, out_channels, 1)
        self.prior = _PriorResidual(prior_channels, out_channels)
        self.prior.zero_head(self.head)

    @property
    def divisor(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = [x]
        for _ in range(self.levels - 1):
            pyramid.append(F.avg_pool3d(pyramid[-1], 2))
        y = run_block(self.blocks[0], [pyramid.pop()])   # coarse to fine, each level dropped
        for i in range(1, self.levels):                 # once used
            y = run_block(self.blocks[i], [pyramid.pop(), self.up[i - 1](y)])
        logits = run_block(nn.Sequential(self.head), [y])
        del y
        return self.prior(logits, x)


#: architecture name -> class (the registry used by the command line and the checkpoints)
ARCHITECTURES = {'unet': UNet3D, 'dpn': DPN3D}


def build_model(architecture: str, in_channels: int, out_channels: int, **config) -> nn.Module:
    """Instantiate a registered architecture (``config`` overrides its defaults)."""
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f'unknown architecture {architecture!r}; choose one of '
                         f'{sorted(ARCHITECTURES)}') from None
    config.pop('in_channels', None), config.pop('out_channels', None)
    if 'features' in config:
        config['features'] = tuple(config['features'])
    return cls(in_channels, out_channels, **config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_input_channels(inputs, n_prior: int) -> int:
    """Number of network input channels for the named ``inputs``."""
    return sum(n_prior if name == 'prior' else 1 for name in inputs)


def check_inputs(inputs) -> list[str]:
    """Validate and order a set of channel names (T1w is required)."""
    inputs = list(inputs)
    unknown = sorted(set(inputs) - set(CHANNELS))
    if unknown or 'T1w' not in inputs or len(set(inputs)) != len(inputs):
        raise ValueError(f'input channels must be T1w plus optional T2w and prior, got {inputs}')
    return [c for c in CHANNELS if c in inputs]
