"""VoxelMorph-style registration network: predicts the stationary velocity field of
:mod:`cerebseg.models.registration` from (subject, entry) at 2 mm, unsupervised.

Architecture (Balakrishnan et al. 2019, diffeomorphic variant of Dalca et al. 2019): a small
3D U-Net on the two images at the 2 mm level of the working grid (padded to a multiple of 8),
encoder 16-32-32-32 channels (stride-2 convolutions, LeakyReLU 0.2), decoder 32-32 with skip
connections, a 3-channel head at 4 mm, resampled onto the instance optimisation's 4 mm control grid,
that is the velocity in mm. Integration (scaling and squaring) and the spatial transformer are those
of :mod:`cerebseg.models.registration`; the training loss is the instance optimisation's objective
(masked squared LNCC at 2 mm + diffusion of the displacement), so the network learns to start the
optimisation where it would end.

Checkpoints: :func:`cerebseg.models.checkpoint.save_regnet` and
:func:`~cerebseg.models.checkpoint.load_regnet` (default weights
:data:`~cerebseg.models.checkpoint.DEFAULT_REGNET`, used only when present); training:
:mod:`cerebseg.training.regnet`.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cerebseg.models import warp as wp

LOGGER = logging.getLogger('cerebseg.models.regnet')

INPUT_MM = 2.0
CONTROL_MM = 4.0


def _block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
                         nn.LeakyReLU(0.2, inplace=True))


class RegNet(nn.Module):
    """(B, 2, X, Y, Z) at 2 mm, X/Y/Z multiples of 8 -> (B, 3, X/2, Y/2, Z/2) velocity (mm)."""

    def __init__(self, enc=(16, 32, 32, 32), dec=(32, 32)):
        super().__init__()
        self.config = {'enc': list(enc), 'dec': list(dec)}
        self.enc0 = _block(2, enc[0])                       # 2 mm
        self.enc1 = _block(enc[0], enc[1], stride=2)        # 4 mm
        self.enc2 = _block(enc[1], enc[2], stride=2)        # 8 mm
        self.enc3 = _block(enc[2], enc[3], stride=2)        # 16 mm
        self.dec2 = _block(enc[3] + enc[2], dec[0])         # 8 mm
        self.dec1 = _block(dec[0] + enc[1], dec[1])         # 4 mm
        self.head = nn.Conv3d(dec[1], 3, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[2:], mode='trilinear'), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[2:], mode='trilinear'), e1], 1))
        return self.head(d1)


def grids(shape, spacing: float):
    """Shapes of the 2 mm input grid and the 4 mm velocity (control) grid of a working grid."""
    return (wp.level_shape(shape, INPUT_MM / spacing),
            wp.level_shape(shape, CONTROL_MM / spacing))


def network_input(fixed: torch.Tensor, moving: torch.Tensor, in_shape) -> torch.Tensor:
    """(K, 2, ...) at 2 mm, zero-padded to multiples of 8: the subject (one, or one per entry)
    next to each entry."""
    f = wp.downsample(fixed, in_shape, blocks=True).expand(moving.shape[0], -1, -1, -1, -1)
    x = torch.cat([f, wp.downsample(moving, in_shape, blocks=True)], dim=1)
    pad = []
    for n in reversed(in_shape):
        pad += [0, (-n) % 8]
    return F.pad(x, pad)


def velocity_from_output(out: torch.Tensor, in_shape, ctrl_shape) -> torch.Tensor:
    """The network's half-resolution output on the (corner-aligned) control grid.

    Output voxel ``j`` sits at input index ``2 j + 0.5``: upsample by 2 with centres kept
    (``align_corners=False``), crop the padding, then resample corner-aligned to the control grid.
    """
    full = F.interpolate(out, scale_factor=2, mode='trilinear', align_corners=False)
    full = full[:, :, :in_shape[0], :in_shape[1], :in_shape[2]]
    return F.interpolate(full, size=tuple(ctrl_shape), mode='trilinear', align_corners=True)


@torch.no_grad()
def predict_velocity(net: RegNet, fixed: np.ndarray, moving: np.ndarray, spacing: float,
                     device='cpu') -> np.ndarray:
    """Velocity (K, 3, ...) in mm on the 4 mm control grid for ``K`` entries onto ``fixed``."""
    device = torch.device(device)
    in_shape, ctrl_shape = grids(fixed.shape, spacing)
    f = torch.as_tensor(np.ascontiguousarray(fixed, np.float32), device=device)[None, None]
    m = torch.as_tensor(np.ascontiguousarray(moving, np.float32), device=device)[:, None]
    net.eval()
    out = net(network_input(f, m, in_shape))
    return velocity_from_output(out, in_shape, ctrl_shape).cpu().numpy()
