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

Checkpoints are dictionaries of tensors and plain metadata, loaded with ``weights_only=True``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cerebseg.models import registration as reg

LOGGER = logging.getLogger('cerebseg.models.regnet')

#: the packaged weights (present only if they passed the registration benchmark)
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / 'data' / 'weights' / 'regnet.pt'
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
    return (reg.level_shape(shape, INPUT_MM / spacing),
            reg.level_shape(shape, CONTROL_MM / spacing))


def network_input(fixed: torch.Tensor, moving: torch.Tensor, in_shape) -> torch.Tensor:
    """(K, 2, ...) at 2 mm, zero-padded to multiples of 8: the subject (one, or one per entry)
    next to each entry."""
    f = reg.downsample(fixed, in_shape, blocks=True).expand(moving.shape[0], -1, -1, -1, -1)
    x = torch.cat([f, reg.downsample(moving, in_shape, blocks=True)], dim=1)
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


def unsupervised_loss(velocity, fixed_l, moving_l, mask_l, sp, ctrl_sp, smoothness, window):
    """The instance optimisation's objective at one level, for a batch of pairs."""
    lshape = tuple(fixed_l.shape[2:])
    u_ctrl = reg.displacement_mm(velocity, tuple(velocity.shape[2:]), ctrl_sp,
                                  reg.SVFConfig().steps)
    eye = torch.eye(3, 4, device=velocity.device).expand(velocity.shape[0], 3, 4)
    warped = reg.warp(moving_l, reg.sampling_ddf(eye, u_ctrl, lshape, sp))
    lncc = reg.MaskedLNCC(fixed_l, mask_l, window)(warped)  # pair by pair: one fixed each
    return (-lncc + smoothness * reg.diffusion_energy(u_ctrl, ctrl_sp)).mean()


def save_regnet(net: RegNet, path, meta: dict, opt_state: dict | None = None) -> None:
    """Atomic checkpoint: architecture, config, weights, plain metadata (and optimiser state)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    ckpt = {'architecture': 'RegNet', 'config': net.config, 'input_mm': INPUT_MM,
            'control_mm': CONTROL_MM, 'state_dict': net.state_dict(), 'meta': meta}
    if opt_state is not None:
        ckpt['optimiser'] = opt_state
    torch.save(ckpt, tmp)
    tmp.replace(path)


def load_regnet(path=None, device='cpu') -> RegNet:
    """Load a checkpoint written by :func:`save_regnet` (strict keys, ``weights_only``)."""
    path = Path(path) if path else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f'No registration network weights at {path}; train them with '
                                '`cerebseg-train registration` or use --registration torch.')
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    if ckpt.get('architecture') != 'RegNet' or ckpt.get('control_mm') != CONTROL_MM:
        raise ValueError(f'{path} is not a cerebseg RegNet checkpoint for a {CONTROL_MM} mm '
                         'control grid')
    net = RegNet(**ckpt['config'])
    net.load_state_dict(ckpt['state_dict'], strict=True)
    return net.to(torch.device(device)).eval()


def train_regnet(subjects: list[np.ndarray], entries: list[np.ndarray], *, spacing: float,
                 steps: int, batch: int = 4, lr: float = 1e-3, smoothness: float = 0.5,
                 window: int = 5, seed: int = 0, device='cpu', max_mm: float = 4.0,
                 net: RegNet | None = None, start_step: int = 0, opt_state: dict | None = None,
                 checkpoint=None, log_every: int = 25, validation=None) -> RegNet:
    """Unsupervised training on random (subject, entry) pairs of working-grid volumes.

    Each pair is a subject (deformed by a random diffeomorphism of up to ``max_mm`` for variety
    and with its intensities jittered) and a library entry. ``checkpoint(net, opt, step, loss)`` is
    called every ``log_every`` steps (resumable training); ``validation`` (fixed, moving) pairs
    are scored with the same loss at those points. Pass ``net``, ``start_step`` and
    ``opt_state`` (the optimiser state saved by ``checkpoint``) to resume.
    """
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = (net or RegNet()).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    if opt_state:
        opt.load_state_dict(opt_state)
    shape = subjects[0].shape
    in_shape, ctrl_shape = grids(shape, spacing)
    sp = reg.level_spacing(shape, spacing, in_shape)
    ctrl_sp = reg.level_spacing(shape, spacing, ctrl_shape)
    # everything is trained at 2 mm: move the volumes there once
    to_t = lambda a: torch.as_tensor(np.ascontiguousarray(a, np.float32))[None, None]  # noqa
    subj = [reg.downsample(to_t(s), in_shape, blocks=True) for s in subjects]
    ents = [reg.downsample(to_t(e), in_shape, blocks=True) for e in entries]
    masks = [(reg.downsample(to_t(m), in_shape, blocks=True) > 0.5).float()
             for m in reg.fov_mask(np.stack(entries))]

    def sample():
        fs, ms, ks = [], [], []
        for _ in range(batch):
            s = subj[rng.integers(len(subj))][0, 0].numpy()
            v = reg.random_velocity(in_shape, spacing * (shape[0] - 1) / (in_shape[0] - 1),
                                    seed=int(rng.integers(1 << 30)), max_mm=max_mm)
            s = reg.random_deformation(s[None], v, float(sp[0]))[0]
            s = np.clip(s, 0, None) ** rng.uniform(0.8, 1.25) * rng.uniform(0.9, 1.1)
            e = int(rng.integers(len(ents)))
            fs.append(torch.as_tensor(s.astype(np.float32))[None, None])
            ms.append(ents[e])
            ks.append(masks[e])
        return torch.cat(fs), torch.cat(ms), torch.cat(ks)

    def batch_loss(f, m, k):
        v = velocity_from_output(net(network_input(f, m, in_shape)), in_shape, ctrl_shape)
        return unsupervised_loss(v, f, m, k, sp, ctrl_sp, smoothness, window)

    for step in range(start_step, steps):
        net.train()
        f, m, k = (t.to(device) for t in sample())
        opt.zero_grad()
        loss = batch_loss(f, m, k)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            msg = f'step {step + 1}/{steps}: loss {float(loss.detach()):.4f}'
            if validation:
                net.eval()
                with torch.no_grad():
                    vals = [float(batch_loss(
                        reg.downsample(to_t(fv), in_shape, blocks=True).to(device),
                        ents[e].to(device), masks[e].to(device))) for fv, e in validation]
                msg += f', validation {np.mean(vals):.4f}'
            LOGGER.info(msg)
            if checkpoint:
                checkpoint(net, opt, step + 1, float(loss.detach()))
    return net
