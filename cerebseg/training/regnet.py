"""Training of the registration network (:class:`cerebseg.models.regnet.RegNet`), unsupervised.

Random (subject, library entry) pairs at 2 mm: the subject deformed by a random diffeomorphism
(:func:`cerebseg.training.augment.random_velocity`) and its intensities jittered; the loss is
the instance optimisation's objective (:func:`unsupervised_loss`: masked squared LNCC +
diffusion of the displacement), so that the network learns to start the optimisation where it
would end. Checkpoints: :func:`cerebseg.models.checkpoint.save_regnet`.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from cerebseg.models import registration as reg
from cerebseg.models import warp as wp
from cerebseg.models.regnet import RegNet, grids, network_input, velocity_from_output
from cerebseg.training.augment import random_deformation, random_velocity

LOGGER = logging.getLogger('cerebseg.training.regnet')


def unsupervised_loss(velocity, fixed_l, moving_l, mask_l, sp, ctrl_sp, smoothness, window):
    """The instance optimisation's objective at one level, for a batch of pairs."""
    lshape = tuple(fixed_l.shape[2:])
    u_ctrl = wp.displacement_mm(velocity, tuple(velocity.shape[2:]), ctrl_sp,
                                  reg.SVFConfig().steps)
    eye = torch.eye(3, 4, device=velocity.device).expand(velocity.shape[0], 3, 4)
    warped = wp.warp(moving_l, wp.sampling_ddf(eye, u_ctrl, lshape, sp))
    lncc = reg.MaskedLNCC(fixed_l, mask_l, window)(warped)  # pair by pair: one fixed each
    return (-lncc + smoothness * reg.diffusion_energy(u_ctrl, ctrl_sp)).mean()




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
    sp = wp.level_spacing(shape, spacing, in_shape)
    ctrl_sp = wp.level_spacing(shape, spacing, ctrl_shape)
    # everything is trained at 2 mm: move the volumes there once
    to_t = lambda a: torch.as_tensor(np.ascontiguousarray(a, np.float32))[None, None]  # noqa
    subj = [wp.downsample(to_t(s), in_shape, blocks=True) for s in subjects]
    ents = [wp.downsample(to_t(e), in_shape, blocks=True) for e in entries]
    masks = [(wp.downsample(to_t(m), in_shape, blocks=True) > 0.5).float()
             for m in reg.fov_mask(np.stack(entries))]

    def sample():
        fs, ms, ks = [], [], []
        for _ in range(batch):
            s = subj[rng.integers(len(subj))][0, 0].numpy()
            v = random_velocity(in_shape, spacing * (shape[0] - 1) / (in_shape[0] - 1),
                                    seed=int(rng.integers(1 << 30)), max_mm=max_mm)
            s = random_deformation(s[None], v, float(sp[0]))[0]
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
                        wp.downsample(to_t(fv), in_shape, blocks=True).to(device),
                        ents[e].to(device), masks[e].to(device))) for fv, e in validation]
                msg += f', validation {np.mean(vals):.4f}'
            LOGGER.info(msg)
            if checkpoint:
                checkpoint(net, opt, step + 1, float(loss.detach()))
    return net
