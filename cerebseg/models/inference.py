"""Inference: the device, and one predictor per dimensionality (the only module that names CUDA).

* :func:`resolve_device`: ``auto``, ``cpu`` or ``cuda[:N]``;
* 3D (the DeepCeres cascade, :mod:`cerebseg.models.cascade`): the network input channels
  (:class:`Channels`), padded in one copy (:func:`padded_input`), class probabilities of a
  volume by :func:`predict` (one pass with the softmax in place, or MONAI's Gaussian-weighted
  sliding windows);
* 2D (the brainstem networks): the slicing of a box volume into network inputs
  (:class:`Slicing`: axial slices, 2.5D context, a fixed crop window, resizing), and
  :func:`predict_volume`, every axial slice segmented and the probabilities stacked back into
  the volume. The trainers (:mod:`cerebseg.training`) cut their slices and score their
  networks with the same functions.

Imports torch, MONAI and NumPy (no nipype, nothing from the trainers).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from cerebseg.models.nets3d import SLAB

LOGGER = logging.getLogger('cerebseg.models.inference')


def resolve_device(name: str = 'auto'):
    """``'auto'`` -> CUDA when available else CPU; ``'cpu'``; ``'cuda'`` or ``'cuda:N'``.

    Raises ``ValueError`` when CUDA is asked for and not available, naming the fix.
    """
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cpu':
        return torch.device('cpu')
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ValueError(f'--device {name} was requested but no CUDA device is available '
                             '(this torch build or this machine has none); use --device cpu '
                             'or --device auto.')
        return torch.device(name)
    raise ValueError(f'Unknown device {name!r}; use auto, cpu or cuda[:N].')


# ------------------------------------------------------------------------------- 3D

class Channels:
    """Network input channels, kept compact: the MR images (float16) then the prior (uint8,
    probability * 255). Indexing ``[:, x, y, z]`` and ``np.asarray`` give float32."""

    def __init__(self, mr: np.ndarray, prior: np.ndarray | None = None):
        self.mr = mr
        self.prior = prior

    @property
    def shape(self) -> tuple[int, ...]:
        n = len(self.mr) + (0 if self.prior is None else len(self.prior))
        return (n,) + self.mr.shape[1:]

    def __getitem__(self, index) -> np.ndarray:
        parts = [self.mr[index].astype(np.float32)]
        if self.prior is not None:
            parts.append(self.prior[index].astype(np.float32) / np.float32(255))
        return np.concatenate(parts)

    def channel(self, c: int) -> np.ndarray:
        """Channel ``c`` as float32, converted as :meth:`__getitem__` converts it."""
        n_mr = len(self.mr)
        if c < n_mr:
            return self.mr[c].astype(np.float32)
        return self.prior[c - n_mr].astype(np.float32) / np.float32(255)

    def __array__(self, dtype=None, copy=None):
        out = self[(slice(None),) * 4]
        return out if dtype is None else out.astype(dtype, copy=False)


def padded_input(image, divisor: int) -> torch.Tensor:
    """``(1, C, X', Y', Z')`` float32 of a ``(C, X, Y, Z)`` volume (an array or
    :class:`Channels`), zero-padded at the end to multiples of ``divisor``, filled channel by
    channel: one copy of the input, where converting then padding made three."""
    shape = tuple(image.shape[1:])
    padded = tuple(s + (-s) % divisor for s in shape)
    x = torch.zeros((1, image.shape[0]) + padded, dtype=torch.float32)
    inside = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    for c in range(image.shape[0]):
        plane = image.channel(c) if isinstance(image, Channels) \
            else np.asarray(image[c], np.float32)
        x[(0, c) + inside] = torch.from_numpy(plane)
    return x


def softmax_(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``torch.softmax`` over ``dim`` written into ``logits``, slab by slab along the first
    spatial axis (no second full-size tensor)."""
    for start in range(0, logits.shape[2], SLAB):
        part = logits[:, :, start:start + SLAB]
        part.copy_(torch.softmax(part, dim))
    return logits


@torch.inference_mode()
def predict(model, image: np.ndarray, *, device='cpu', roi: int = 128, overlap: float = 0.25,
            bf16: bool = False) -> torch.Tensor:
    """Class probabilities ``(L, X, Y, Z)`` (float32, CPU) of one ``(C, X, Y, Z)`` volume,
    by sliding windows of ``roi`` voxels (Gaussian-weighted, MONAI) where it is larger; a
    volume that fits in one window goes through the network once, its softmax in place."""
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    model.eval()
    div = getattr(model, 'divisor', 1)
    shape = tuple(image.shape[1:])
    x = padded_input(image, div).to(device)
    window = roi - roi % div
    use_bf16 = bf16 or device.type == 'cuda'

    def forward(patch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return model(patch)

    if all(s <= window for s in x.shape[2:]):
        logits = forward(x)
        del x
        out = softmax_(logits.float())
    else:
        roi_size = [min(window, s) for s in x.shape[2:]]
        out = sliding_window_inference(x, roi_size, 1, lambda p: torch.softmax(
            forward(p).float(), 1), overlap=overlap, mode='gaussian')
    out = out[0, :, :shape[0], :shape[1], :shape[2]].float().cpu()
    # a copy without the padding: a view would keep the whole padded tensor alive
    return out if out.is_contiguous() else out.contiguous()


# ------------------------------------------------------------------------------- 2D


@dataclass(frozen=True)
class Slicing:
    """How a box volume becomes network inputs: ``size`` (a multiple of the network's divisor),
    ``context`` neighbours per side (2.5D), the ``crop`` window side (voxels) and its
    ``center`` (x, y voxel coordinates; None: the middle of the plane)."""

    size: int = 96
    context: int = 0
    crop: int = 64
    center: tuple[float, float] | None = None

    def __post_init__(self):
        if self.size < 1 or self.crop < 1 or self.context < 0:
            raise ValueError(f'bad slicing: size={self.size} (>= 1), crop={self.crop} (>= 1), '
                             f'context={self.context} (>= 0)')
        if self.center is not None:
            object.__setattr__(self, 'center', tuple(float(c) for c in self.center))

    @property
    def channels(self) -> list[str]:
        """Input channel names, e.g. ``['T1w-1', 'T1w', 'T1w+1']``."""
        return [f'T1w{d:+d}' if d else 'T1w' for d in range(-self.context, self.context + 1)]

    def window(self, plane: tuple[int, int]) -> tuple[int, int]:
        """First (x, y) voxel of the crop window in a plane of shape ``plane``."""
        center = self.center or tuple((s - 1) / 2 for s in plane)
        return tuple(math.floor(c - self.crop / 2 + 1.0) for c in center)

    def to_dict(self) -> dict:
        return {'size': self.size, 'context': self.context, 'crop': self.crop,
                'center': None if self.center is None else list(self.center)}


def slice_stack(volume: np.ndarray, z, context: int) -> np.ndarray:
    """``(X, Y, Z)`` -> ``(len(z), 2 * context + 1, X, Y)``: slices ``z - context .. z +
    context`` of each ``z`` (indices clipped to the volume: the edge slice repeats)."""
    z = np.asarray(z, int)
    idx = np.clip(z[:, None] + np.arange(-context, context + 1)[None], 0, volume.shape[2] - 1)
    return np.ascontiguousarray(np.moveaxis(volume[:, :, idx], (2, 3), (0, 1)))


def _window_slices(start: tuple[int, int], crop: int, plane: tuple[int, int]):
    """(source, destination) index slices of a crop window that may leave the plane."""
    src, dst = [], []
    for a, s in zip(start, plane):
        lo, hi = max(a, 0), min(a + crop, s)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - a, max(lo, hi) - a))
    return tuple(src), tuple(dst)


def crop_plane(stack: np.ndarray, slicing: Slicing) -> np.ndarray:
    """``(..., X, Y)`` -> ``(..., crop, crop)``: the window of ``slicing``, zero outside."""
    plane = stack.shape[-2:]
    src, dst = _window_slices(slicing.window(plane), slicing.crop, plane)
    out = np.zeros(stack.shape[:-2] + (slicing.crop,) * 2, stack.dtype)
    out[(Ellipsis,) + dst] = stack[(Ellipsis,) + src]
    return out


def resize(x: torch.Tensor, size: int, mode: str = 'bilinear') -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, size, size)``; bilinear (antialiased when shrinking) or
    nearest (label maps)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if mode == 'nearest':
        return F.interpolate(x, size=(size, size), mode='nearest')
    shrink = size < min(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False,
                         antialias=shrink)


@torch.inference_mode()
def predict_volume(model, t1_box: np.ndarray, size: int, *, context: int = 0, crop: int = 64,
                   center=None, batch_size: int = 32, device=None, slices=None,
                   bf16: bool = False) -> np.ndarray:
    """Class probabilities ``(L, X, Y, Z)`` float32 of a ``(X, Y, Z)`` box volume.

    Every axial slice (or only ``slices``, z indices; the others get background) is cut as in
    :class:`Slicing` (pass a checkpoint's ``meta['slicing']`` as keyword arguments), resized to
    ``size``, segmented by ``model`` (``(N, C, size, size)`` -> logits ``(N, L, size, size)``)
    in batches of ``batch_size``; the softmax is resized back to the crop window and placed in
    the volume (background probability 1 outside the window). ``device``: the model's by
    default; bfloat16 autocast with ``bf16`` or on CUDA.
    """
    slicing = Slicing(size=size, context=context, crop=crop, center=center)
    vol = np.asarray(t1_box, np.float32)
    if vol.ndim != 3:
        raise ValueError(f'predict_volume needs an (X, Y, Z) volume, got shape {vol.shape}')
    cfg = getattr(model, 'config', {})
    if cfg.get('in_channels', 2 * context + 1) != 2 * context + 1:
        raise ValueError(f'the network takes {cfg["in_channels"]} input channels, context '
                         f'{context} gives {2 * context + 1}; use the slicing of its checkpoint')
    div = getattr(model, 'divisor', 1)
    if size % div:
        raise ValueError(f'size {size} must be a multiple of {div} for this network')
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.eval()
    z_all = np.arange(vol.shape[2]) if slices is None else np.asarray(slices, int)
    use_bf16 = bf16 or device.type == 'cuda'
    start = slicing.window(vol.shape[:2])
    src, dst = _window_slices(start, crop, vol.shape[:2])
    out = None
    for i in range(0, len(z_all), batch_size):
        z = z_all[i:i + batch_size]
        x = torch.from_numpy(crop_plane(slice_stack(vol, z, context), slicing)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(resize(x, size))
        probs = resize(torch.softmax(logits.float(), 1), crop).cpu().numpy()
        if out is None:
            out = np.zeros((probs.shape[1],) + vol.shape, np.float32)
            out[0] = 1
        out[:, :, :, z] = 0
        out[0, :, :, z] = 1
        region = np.moveaxis(probs[(Ellipsis,) + dst], 0, -1)  # (L, x, y, z)
        out[(slice(None),) + src + (z,)] = region
    if out is None:
        n = cfg.get('n_classes', 1)
        out = np.zeros((n,) + vol.shape, np.float32)
        out[0] = 1
    return out
