"""``cerebseg-train``: train cerebseg's networks on your data.

``cerebseg-train registration BIDS_DIR --out regnet.pt`` trains the registration network
(:mod:`cerebseg.models.regnet`) without labels, on the T1w images of a BIDS dataset placed
affinely in the working grid and on the entries of an atlas library. Prepared volumes are cached
in ``--work-dir``; the checkpoint is written every ``--checkpoint-every`` steps and a re-run with
``--resume`` continues from it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cerebseg import __version__
from cerebseg.errors import CerebsegError, UsageError

LOGGER = logging.getLogger('cerebseg.train')


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='cerebseg-train',
                                     description='Train the networks of cerebseg.')
    parser.add_argument('--version', action='version', version=f'cerebseg {__version__}')
    sub = parser.add_subparsers(dest='command', required=True)
    cmd = sub.add_parser('registration', help='the unsupervised registration network')
    cmd.add_argument('bids_dir', type=Path, help='BIDS dataset with T1w images')
    cmd.add_argument('--out', type=Path, required=True, help='checkpoint to write (.pt)')
    cmd.add_argument('--assets-dir', type=Path, default=None,
                     help='cerebseg assets (default: $CEREBSEG_ASSETS, then the user cache)')
    cmd.add_argument('--atlas-library', default='suit', help='library whose entries are used')
    cmd.add_argument('--participant-label', nargs='+', default=None,
                     help='participants to train on (default: all)')
    cmd.add_argument('--exclude-label', nargs='+', default=[],
                     help='participants to leave out (e.g. those of a benchmark)')
    cmd.add_argument('--validation-label', nargs='+', default=[],
                     help='participants scored (not trained on) at every checkpoint')
    cmd.add_argument('--steps', type=int, default=600)
    cmd.add_argument('--batch-size', type=int, default=4)
    cmd.add_argument('--learning-rate', type=float, default=1e-3)
    cmd.add_argument('--checkpoint-every', type=int, default=25)
    cmd.add_argument('--work-dir', type=Path, default=Path('work_cerebseg_train'))
    cmd.add_argument('--resume', action='store_true', help='continue from --out')
    cmd.add_argument('--device', default='auto', help='auto, cpu or cuda[:N]')
    cmd.add_argument('--nthreads', type=int, default=os.cpu_count() or 1)
    cmd.add_argument('--random-seed', type=int, default=0)
    cmd.add_argument('-v', '--verbose', action='count', default=0)
    return parser


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


def train_registration(opts) -> int:
    import nibabel as nib
    import numpy as np
    import torch

    from cerebseg.assets.locate import load_assets
    from cerebseg.models.inference import resolve_device
    from cerebseg.models.regnet import load_regnet, save_regnet, train_regnet

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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault('NIPYPE_NO_ET', '1')
    opts = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if opts.verbose > 1 else logging.INFO,
                        format='%(asctime)s %(name)s %(levelname)s: %(message)s',
                        stream=sys.stderr)
    try:
        return train_registration(opts)
    except CerebsegError as err:
        LOGGER.error('%s', err)
        return err.exit_code


if __name__ == '__main__':
    raise SystemExit(main())
