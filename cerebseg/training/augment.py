"""Augmentation for the trainers: one family for 3D patches and 2D slices, and random
diffeomorphisms.

:class:`Augment` holds every setting; its two presets are those the trainers use:

* :meth:`Augment.patches` (the DeepCeres cascade, 3D patches, :func:`augment_patch`): left-right
  flips that swap the left and right classes (and prior channels), gamma, contrast, offset and
  Gaussian noise on the MR channels, an elastic deformation (a random diffeomorphism of up to
  ``elastic_mm``, :func:`random_velocity` and :func:`random_deformation`);
* :meth:`Augment.slices` (the 2D brainstem networks, batches of slices, :func:`augment_batch`):
  a rotation, zoom and translation applied in the resampling to the network's size, the same
  intensity changes, and left-right flips only when asked for.

:func:`random_velocity` and :func:`random_deformation` also make the known deformations of the
benchmarks and of the registration network's training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from cerebseg.models.inference import resize
from cerebseg.models.warp import displacement_mm, level_shape, level_spacing, resize_field, warp


@dataclass(frozen=True)
class Augment:
    """Augmentation settings (probabilities and ranges); the defaults are the 3D patches'.

    Intensity (both): gamma on the clipped intensities, then a gain (``contrast``), an offset
    (up to +-``offset``) and Gaussian noise (standard deviation up to ``noise``); left-right
    flips with probability ``flip`` (0: off). 3D patches: an elastic deformation with
    probability ``elastic``, of up to ``elastic_mm`` on a grid of ``spacing`` mm; with
    probability ``simulated_prior``, the prior channels replaced by the patch's own labels moved
    by a random smooth deformation of ``prior_mm`` at most and blurred by ``prior_blur_mm``
    (:func:`simulate_prior`). 2D slices: with
    probability ``p_spatial``, a rotation (+-``rotate`` degrees), an isotropic zoom and a
    translation (+-``translate`` of the side).
    """

    flip: float = 0.5
    simulated_prior: float = 0.0
    prior_mm: tuple[float, float] = (1.0, 4.0)
    prior_blur_mm: tuple[float, float] = (0.5, 1.5)
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.9, 1.1)
    offset: float = 0.1
    noise: float = 0.03
    elastic: float = 0.3
    elastic_mm: float = 2.0
    spacing: float = 0.5
    p_spatial: float = 0.8
    rotate: float = 10.0
    zoom: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05

    @classmethod
    def patches(cls, **changes) -> 'Augment':
        """The DeepCeres trainer's settings for 3D patches (``changes`` override them)."""
        return cls(**changes)

    @classmethod
    def slices(cls, **changes) -> 'Augment':
        """The brainstem trainer's light settings for 2D slices (no flips unless asked)."""
        return cls(**{'flip': 0.0, 'gamma': (0.8, 1.25), 'offset': 0.05, 'noise': 0.02,
                      **changes})


def flip_lr(image: np.ndarray, target: np.ndarray, perm: np.ndarray, n_mr: int):
    """Mirror a patch along x and swap left/right classes (and prior channels)."""
    image = image[:, ::-1]
    target = perm[target[::-1]].astype(target.dtype)
    if image.shape[0] > n_mr:  # prior channel c is class c + 1
        order = perm[1:] - 1
        image = np.concatenate([image[:n_mr], image[n_mr:][order]])
    return np.ascontiguousarray(image), np.ascontiguousarray(target)


def augment_patch(image, target, rng: np.random.Generator, aug: Augment, perm, n_mr: int):
    """Flip, intensity and elastic augmentation of one 3D patch ``(C, X, Y, Z)`` (MR channels
    are the first ``n_mr``; the prior channels only move with the geometry). Settings:
    :meth:`Augment.patches`."""
    if rng.random() < aug.flip:
        image, target = flip_lr(image, target, perm, n_mr)
    image = image.copy()
    if image.shape[0] > n_mr and rng.random() < aug.simulated_prior:
        image[n_mr:] = simulate_prior(target, image.shape[0] - n_mr + 1, rng, aug)
    for c in range(n_mr):
        ch = np.clip(image[c], 0, None) ** rng.uniform(*aug.gamma)
        ch = ch * rng.uniform(*aug.contrast) + rng.uniform(-aug.offset, aug.offset)
        image[c] = ch + rng.normal(0, rng.uniform(0, aug.noise), ch.shape).astype(np.float32)
    if rng.random() < aug.elastic:
        v = random_velocity(target.shape, aug.spacing, seed=int(rng.integers(1 << 30)),
                                max_mm=aug.elastic_mm)
        image = random_deformation(image, v, aug.spacing)
        target = random_deformation(target[None], v, aug.spacing, order=0)[0]
    return image.astype(np.float32), target


def simulate_prior(target: np.ndarray, n_classes: int, rng: np.random.Generator,
                   aug: Augment) -> np.ndarray:
    """A multi-atlas-like prior made from the labels themselves: the one-hot ``target`` (class
    indices ``(X, Y, Z)``) warped by a random smooth diffeomorphism whose largest displacement
    is drawn from ``aug.prior_mm`` (control points 6-12 mm apart), blurred by a Gaussian of
    ``aug.prior_blur_mm`` (sigma), renormalised. Returns the foreground classes' probabilities
    ``(n_classes - 1, X, Y, Z)`` in [0, 1], as the prior channels of a patch: errors of the kind
    registration makes, placed at random rather than where the library's anatomies put them."""
    from scipy import ndimage

    onehot = np.eye(n_classes, dtype=np.float32)[target].transpose(3, 0, 1, 2)
    v = random_velocity(target.shape, aug.spacing, seed=int(rng.integers(1 << 30)),
                        max_mm=float(rng.uniform(*aug.prior_mm)),
                        control_mm=float(rng.uniform(6.0, 12.0)))
    probs = random_deformation(onehot, v, aug.spacing)
    sigma = float(rng.uniform(*aug.prior_blur_mm)) / aug.spacing
    probs = np.stack([ndimage.gaussian_filter(c, sigma, mode='nearest') for c in probs])
    probs /= np.maximum(probs.sum(0), 1e-6)
    return np.clip(probs[1:], 0, 1)


def augment_batch(x: torch.Tensor, y: torch.Tensor, size: int, rng: np.random.Generator,
                  aug: Augment, perm: np.ndarray | None = None):
    """Augment and resize a batch of 2D slices ``x (B, C, H, W)``, ``y (B, H, W)`` to ``size``
    (one resampling: bilinear for ``x``, nearest for ``y``, reflection at the borders).
    Settings: :meth:`Augment.slices`."""
    b = x.shape[0]
    if aug.flip > 0:
        if perm is None:
            raise ValueError('left-right flips need the class swap (perm); pass '
                             'cerebseg.utils.labels.swap_classes(labels) or set flip to 0')
        flip = torch.from_numpy(rng.random(b) < aug.flip)
        if flip.any():  # rows are x: mirror them and swap left/right classes
            x, y = x.clone(), y.clone()
            x[flip] = x[flip].flip(-2)
            y[flip] = torch.from_numpy(perm).long()[y[flip].flip(-2)]
    theta = np.zeros((b, 2, 3), np.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    spatial = rng.random(b) < aug.p_spatial
    for i in np.flatnonzero(spatial):
        a = math.radians(rng.uniform(-aug.rotate, aug.rotate))
        s = 1 / rng.uniform(*aug.zoom)
        theta[i, :, :2] = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        theta[i, :, 2] = rng.uniform(-2 * aug.translate, 2 * aug.translate, 2)
    if spatial.any():
        grid = F.affine_grid(torch.from_numpy(theta), (b, 1, size, size), align_corners=False)
        x = F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection',
                          align_corners=False)
        y = F.grid_sample(y[:, None].float(), grid, mode='nearest', padding_mode='reflection',
                          align_corners=False)[:, 0].long()
    else:
        x, y = resize(x, size), resize(y[:, None].float(), size, 'nearest')[:, 0].long()
    gamma = torch.from_numpy(rng.uniform(*aug.gamma, (b, 1, 1, 1)).astype(np.float32))
    gain = torch.from_numpy(rng.uniform(*aug.contrast, (b, 1, 1, 1)).astype(np.float32))
    offset = torch.from_numpy(rng.uniform(-aug.offset, aug.offset, (b, 1, 1, 1))
                              .astype(np.float32))
    sigma = torch.from_numpy(rng.uniform(0, aug.noise, (b, 1, 1, 1)).astype(np.float32))
    noise = torch.from_numpy(rng.standard_normal(tuple(x.shape)).astype(np.float32))
    x = x.clamp_min(0) ** gamma * gain + offset + sigma * noise
    return x.contiguous(), y.contiguous()


def random_velocity(shape, spacing: float, *, seed: int, max_mm: float = 4.0,
                    control_mm: float = 8.0) -> np.ndarray:
    """A random smooth stationary velocity field (3, X, Y, Z) in mm, for known deformations.

    Gaussian noise on a ``control_mm`` lattice, smoothed, scaled so that the largest component
    is ``max_mm``, upsampled trilinearly. Integrated by :func:`random_deformation`.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    cshape = level_shape(shape, control_mm / spacing)
    noise = rng.standard_normal((3,) + cshape)
    noise = np.stack([ndimage.gaussian_filter(c, 1.0, mode='nearest') for c in noise])
    noise *= max_mm / np.abs(noise).max()
    return resize_field(torch.as_tensor(noise, dtype=torch.float32)[None], shape)[0].numpy()


@torch.no_grad()
def random_deformation(volumes: np.ndarray, velocity_mm: np.ndarray, spacing: float, *,
                       order: int = 1, steps: int = 7) -> np.ndarray:
    """Warp (N, X, Y, Z) volumes by exp(``velocity_mm``) (a diffeomorphism; labels: order 0)."""
    shape = volumes.shape[1:]
    sp = level_spacing(shape, spacing, shape)
    u = displacement_mm(torch.as_tensor(velocity_mm, dtype=torch.float32)[None], shape, sp, steps)
    ddf = u / sp.view(1, 3, 1, 1, 1)
    vol = torch.as_tensor(np.ascontiguousarray(volumes, np.float32))[None]
    out = warp(vol, ddf, 'nearest' if order == 0 else 'bilinear')[0].numpy()
    return np.rint(out).astype(volumes.dtype) if order == 0 else out
