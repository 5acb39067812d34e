"""``cerebseg-train registration BIDS_DIR --out regnet.pt``: train the registration network
(:mod:`cerebseg.models.regnet`, trainer :mod:`cerebseg.training.regnet`) without labels,
on the T1w images of a BIDS dataset placed affinely in the working grid and on the entries of an
atlas library. Prepared volumes are cached in ``--work-dir``; the checkpoint is written every
``--checkpoint-every`` steps and a re-run with ``--resume`` continues from it.
"""
from __future__ import annotations

import logging
from pathlib import Path

from cerebseg import __version__

from cerebseg.errors import UsageError

LOGGER = logging.getLogger('cerebseg.train')


def _t1w_files(bids_dir: Path, include, exclude) -> dict[str, Path]:
    """The first T1w of each participant (sorted), as {label: path}."""
    found = {}
    for sub in sorted(p for p in bids_dir.glob('sub-*') if p.is_dir()):
        label = sub.name[4:]
        if (include and label not in include) or label in exclude:
            continue
        t1s = sorted(sub.glob('**/anat/*_T1w.nii*'))
        if t1s:
            found[label] = t1s[0]
    return found


def _prepared(label: str, path: Path, assets, work_dir: Path, seed: int):
    """The participant's T1w in the working grid (affine path), cached as .npy."""
    import numpy as np

    from cerebseg.utils.registration import MIN_TEMPLATE_CORRELATION, affine_to_box

    cache = work_dir / f'sub-{label}_box.npy'
    if cache.is_file():
        return np.load(cache)
    LOGGER.info('Placing sub-%s in the working grid (affine)', label)
    image, corr = affine_to_box(str(path), assets, seed=seed)
    if corr < MIN_TEMPLATE_CORRELATION:
        LOGGER.warning('sub-%s fits the template poorly (correlation %.2f); skipped', label, corr)
        return None
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix('.tmp.npy')
    np.save(tmp, image)
    tmp.replace(cache)
    return image


def run(opts) -> int:
    """``cerebseg-train registration``: train the registration network."""
    import nibabel as nib
    import numpy as np
    import torch

    from cerebseg.assets.locate import load_assets
    from cerebseg.models.inference import resolve_device
    from cerebseg.models.checkpoint import load_regnet, save_regnet
    from cerebseg.training.regnet import train_regnet

    if not opts.bids_dir.is_dir():
        raise UsageError(f'BIDS folder not found: {opts.bids_dir}')
    try:
        device = resolve_device(opts.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    torch.set_num_threads(max(opts.nthreads, 1))
    assets = load_assets(opts.assets_dir)
    library = assets.library(opts.atlas_library)
    entries = [np.asarray(nib.load(assets.path(e['files']['t1w'])).dataobj, np.float32)
               for e in library['entries']]
    files = _t1w_files(opts.bids_dir, opts.participant_label,
                       set(opts.exclude_label) | set(opts.validation_label))
    if not files:
        raise UsageError(f'No T1w images to train on in {opts.bids_dir} with the participant '
                         'selection given.')
    subjects = [img for label, path in files.items()
                if (img := _prepared(label, path, assets, opts.work_dir,
                                     opts.random_seed)) is not None]
    val_files = _t1w_files(opts.bids_dir, opts.validation_label, set()) \
        if opts.validation_label else {}
    validation = []
    for label, path in val_files.items():
        img = _prepared(label, path, assets, opts.work_dir, opts.random_seed)
        if img is not None:
            validation += [(img, e) for e in range(len(entries))]
    meta = {'cerebseg_version': __version__, 'library': opts.atlas_library,
            'entries': [e['name'] for e in library['entries']],
            'training_participants': sorted(files), 'bids_dir': opts.bids_dir.name,
            'seed': opts.random_seed, 'batch_size': opts.batch_size,
            'learning_rate': opts.learning_rate}
    net, start, opt_state = None, 0, None
    if opts.resume and opts.out.is_file():
        net = load_regnet(opts.out, device=device)
        ckpt = torch.load(opts.out, map_location='cpu', weights_only=True)
        start, opt_state = int(ckpt['meta'].get('steps', 0)), ckpt.get('optimiser')
        LOGGER.info('Resuming from %s at step %d', opts.out, start)

    def checkpoint(net, opt, step, loss):
        save_regnet(net, opts.out, dict(meta, steps=step, last_loss=loss), opt.state_dict())

    train_regnet(subjects, entries, spacing=float(assets.manifest['grid']['spacing']),
                 steps=opts.steps, batch=opts.batch_size, lr=opts.learning_rate,
                 seed=opts.random_seed, device=device, net=net, start_step=start,
                 opt_state=opt_state, checkpoint=checkpoint,
                 log_every=opts.checkpoint_every, validation=validation)
    LOGGER.info('Registration network written: %s', opts.out)
    return 0
