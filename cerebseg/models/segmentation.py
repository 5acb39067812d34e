"""DeepCeres segmentation networks (3D U-Net, Deep Pyramidal Network), registry, checkpoints.

Both nets map ``(N, C, X, Y, Z)`` input channels to ``(N, L, X, Y, Z)`` class logits. The input
channels are named (:data:`CHANNELS`): ``T1w``, ``T2w`` (optional) and ``prior`` (optional; the
multi-atlas prior, one channel per foreground class of the stage). A checkpoint records them,
and :func:`load_checkpoint` refuses a checkpoint whose inputs differ from the ones asked for.

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
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from cerebseg.errors import MissingAssetError

LOGGER = logging.getLogger(__name__)

#: input channel names, in the order they are stacked (``prior`` expands to several channels)
CHANNELS = ('T1w', 'T2w', 'prior')
CHECKPOINT_FORMAT = 'cerebseg-segmentation'
CHECKPOINT_VERSION = 1


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


class CheckpointError(MissingAssetError):
    """A segmentation checkpoint is missing, foreign, corrupt or does not fit the run."""


def save_checkpoint(path, model: nn.Module, *, architecture: str, inputs, stage: str,
                    labels: list, spacing: float, protocol: str, training: dict | None = None,
                    half: bool = False) -> Path:
    """Write a self-describing checkpoint atomically.

    ``labels`` are ``[index, name]`` pairs: output class ``i`` is protocol label
    ``labels[i][0]`` (class 0 is the background). ``half`` stores the weights as float16.
    """
    import json

    from cerebseg import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # plain JSON types only, so that the file loads with weights_only=True
    training = json.loads(json.dumps(training or {}, default=str))
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    ckpt = {'format': CHECKPOINT_FORMAT, 'format_version': CHECKPOINT_VERSION,
            'cerebseg_version': __version__, 'architecture': architecture,
            'config': {k: v for k, v in model.config.items()},
            'inputs': check_inputs(inputs), 'stage': stage,
            'labels': [[int(i), str(n)] for i, n in labels], 'spacing': float(spacing),
            'protocol': protocol, 'training': training, 'state_dict': state}
    tmp = path.with_name(path.name + '.tmp')
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def load_torch_file(path, what: str, hint: str = '', kind: str = 'torch checkpoint'):
    """``torch.load`` (CPU, ``weights_only``) of a weights file; a missing or unreadable file is
    a :class:`CheckpointError` naming it: ``"{what} not found: {path}{hint}"`` and
    ``"{path} is not a readable {kind} ({error}){hint}"``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{what} not found: {path}{hint}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise CheckpointError(f'{path} is not a readable {kind} ({err}){hint}') from err


def read_checkpoint(path) -> dict:
    """The checkpoint dictionary (``weights_only``), checked to be a cerebseg segmentation one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'segmentation weights not found: {path}. Train them with '
                              '`cerebseg-train segmentation` or reinstall cerebseg.')
    ckpt = load_torch_file(path, 'segmentation weights', '; replace it or reinstall cerebseg.')
    return check_format(ckpt, path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                        'a cerebseg segmentation checkpoint')


def check_format(ckpt, path, fmt: str, version: int, kind: str) -> dict:
    """``ckpt`` if it is a dict of format ``fmt`` no newer than ``version``; else
    CheckpointError naming ``path`` (``kind``: what it should have been)."""
    if not isinstance(ckpt, dict) or ckpt.get('format') != fmt:
        raise CheckpointError(f'{path} is not {kind}')
    if ckpt.get('format_version', 0) > version:
        raise CheckpointError(f'{path} was written by a newer cerebseg '
                              f'({ckpt.get("cerebseg_version")}); upgrade cerebseg.')
    return ckpt


def load_checkpoint(path, *, inputs=None, stage: str | None = None, protocol: str | None = None,
                    device='cpu') -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_checkpoint` (strict keys, float32, eval mode).

    ``inputs``, ``stage`` and ``protocol``, when given, must match what the checkpoint was
    trained with; otherwise :class:`CheckpointError` says what differs and how to fix it.
    Returns the model and the checkpoint's metadata (everything but the weights).
    """
    ckpt = read_checkpoint(path)
    meta = {k: v for k, v in ckpt.items() if k != 'state_dict'}
    if inputs is not None and check_inputs(inputs) != meta['inputs']:
        raise CheckpointError(
            f'{path} was trained on the inputs {"+".join(meta["inputs"])}, but this run has '
            f'{"+".join(check_inputs(inputs))}. Use weights trained on these inputs '
            '(`cerebseg-train segmentation --inputs ...`) or change the run options '
            '(--t1-only, --no-atlas-prior).')
    if stage is not None and meta['stage'] != stage:
        raise CheckpointError(f'{path} is a {meta["stage"]} network, not a {stage} network')
    if protocol is not None and meta['protocol'] != protocol:
        raise CheckpointError(f'{path} segments the {meta["protocol"]} label protocol, not '
                              f'{protocol}; use --atlas-library {meta["protocol"]} or weights '
                              f'trained on {protocol} labels')
    model = build_model(meta['architecture'], **meta['config'])
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt['state_dict'].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f'{path}: the weights do not fit the {meta["architecture"]} '
                              f'architecture it declares ({err})') from err
    return model.to(torch.device(device)).eval(), meta


def _channel_names(inputs, n_prior: int) -> list[str]:
    names = []
    for name in check_inputs(inputs):
        names += [f'prior{i}' for i in range(n_prior)] if name == 'prior' else [name]
    return names


def transfer_weights(ckpt: dict, model: nn.Module, inputs, n_prior: int) -> list[str]:
    """Start ``model`` (built for ``inputs``) from a checkpoint trained on other inputs.

    Layers whose input channels differ (those that see the network input: the U-Net's first
    convolution, every DPN block) keep the weights of the channels both input sets have; a
    channel only the new set has (e.g. T2w) starts at zero, so the new network first computes
    what the old one did. Returns the names of the adapted parameters.
    """
    old = _channel_names(ckpt['inputs'], n_prior)
    new = _channel_names(inputs, n_prior)
    state = {k: v.float() for k, v in ckpt['state_dict'].items()}
    target = model.state_dict()
    if set(state) != set(target):
        raise CheckpointError('the checkpoint does not have the architecture of the new network')
    adapted = []
    for key, value in target.items():
        src = state[key]
        if src.shape == value.shape:
            continue
        extra = src.shape[1] - len(old)
        if value.dim() < 2 or extra < 0 or value.shape[1] - len(new) != extra:
            raise CheckpointError(f'{key}: shapes {tuple(src.shape)} and {tuple(value.shape)} '
                                  'differ by more than the input channels')
        out = torch.zeros_like(value)
        for j, name in enumerate(new):
            if name in old:
                out[:, j] = src[:, old.index(name)]
        out[:, len(new):] = src[:, len(old):]
        state[key] = out
        adapted.append(key)
    model.load_state_dict(state, strict=True)
    return adapted
