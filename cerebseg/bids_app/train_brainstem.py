"""``cerebseg-train brainstem --work-dir WORK [WORK ...] --out net.pt``: train a 2D brainstem
network (:mod:`cerebseg.models.nets2d`, trainer :mod:`cerebseg.training.brainstem2d`) on the axial
slices of the brainstem box of every participant run in cerebseg work folders, against the
atlas labels of the run (cerebseg's diffeomorphic registration of the brainstem label set);
``--bids BIDS --assets-dir ASSETS`` runs ``cerebseg ... participant --skip-cerebellum`` first to
make them. ``--out`` holds the best network by validation mIoU (held-out participants).
"""
from __future__ import annotations

import fnmatch
import logging
import os
import sys
from pathlib import Path

from cerebseg.errors import CerebsegError, UsageError

LOGGER = logging.getLogger('cerebseg.train')


def _brainstem_runs(opts) -> list[Path]:
    """Run the brainstem-only pipeline for the participants of ``--bids`` that have no labels
    in ``--prep-dir`` yet; returns the work folder."""
    import subprocess

    from cerebseg.workflows.workdir import BS_DSEG_BOX, run_folders

    if not opts.bids.is_dir():
        raise UsageError(f'BIDS folder not found: {opts.bids}')
    wanted = opts.participant_label or sorted(
        p.name[4:] for p in opts.bids.glob('sub-*') if p.is_dir())
    wanted = [p for p in wanted if p not in opts.exclude_label]
    work, out = opts.prep_dir / 'work', opts.prep_dir / 'derivatives'
    done = [d.name for d in run_folders(work) if (d / BS_DSEG_BOX).is_file()]
    todo = [p for p in wanted if not fnmatch.filter(done, f'cerebseg_sub_{p}_*wf')]
    if todo:
        log = opts.prep_dir / 'cerebseg.log'
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, '-m', 'cerebseg', str(opts.bids), str(out), 'participant',
               '--participant-label', *todo, '--skip-cerebellum', '-w', str(work),
               '--nprocs', str(opts.nthreads), '--omp-nthreads', str(opts.nthreads),
               '--device', opts.device]
        if opts.assets_dir:
            cmd += ['--assets-dir', str(opts.assets_dir)]
        if opts.skip_bids_validation:
            cmd.append('--skip-bids-validation')
        LOGGER.info('Making the training labels of %d participants (log: %s): %s', len(todo),
                    log, ' '.join(cmd))
        with open(log, 'a') as fobj:
            code = subprocess.run(cmd, check=False, stdout=fobj, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, NIPYPE_NO_ET='1')).returncode
        if code:
            raise CerebsegError(f'cerebseg exited {code} while making the training labels; see '
                                f'{log} (fix the failing participants or leave them out with '
                                '--exclude-label)')
    return [work]


def run(opts) -> int:
    """``cerebseg-train brainstem``: train a 2D brainstem network (see the module docstring)."""
    import dataclasses

    import torch

    from cerebseg.errors import BadDataError
    from cerebseg.training import brainstem2d as bt
    from cerebseg.models.checkpoint import CheckpointError, load_encoder_state, \
        save_brainstem_net
    from cerebseg.models.inference import Slicing, resolve_device
    from cerebseg.models.nets2d import build_model
    from cerebseg.training.augment import Augment
    from cerebseg.utils.labels import read_lut

    try:
        device = resolve_device(opts.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if opts.loss != 'dicece' and opts.alpha != 0.1:
        LOGGER.warning('--alpha applies to --loss dicece only; ignored for %s', opts.loss)
    if not 0 <= opts.alpha <= 1 or not 0 <= opts.flip <= 1:
        raise UsageError(f'--alpha ({opts.alpha}) and --flip ({opts.flip}) must be in [0, 1]')
    torch.set_num_threads(opts.nthreads)
    lut = opts.lut
    if lut is None:
        from cerebseg.assets.locate import load_assets

        assets = load_assets(opts.assets_dir, verify=False)
        lut = assets.path(assets.brainstem()['lut'])
    if not Path(lut).is_file():
        raise UsageError(f'lookup table not found: {lut}')
    labels = read_lut(lut)
    work_dirs = opts.work_dir or _brainstem_runs(opts)
    try:
        found = bt.find_cases(work_dirs)
    except ValueError as err:
        raise UsageError(str(err)) from err
    found = [f for f in found if (not opts.participant_label or f[1] in opts.participant_label)
             and f[1] not in opts.exclude_label]
    if not found:
        raise UsageError(f'no participant run in {[str(w) for w in work_dirs]} matches the '
                         'participant selection given')
    try:
        train_people, val_people = bt.split_participants([f[1] for f in found],
                                                         opts.val_fraction, opts.seed)
        cases = [bt.load_case(*f, labels) for f in found]
    except ValueError as err:
        cls = UsageError if 'participants' in str(err) else BadDataError
        raise cls(str(err)) from err
    slicing = Slicing(size=opts.size, context=opts.context, crop=opts.crop)
    train = bt.SliceDataset([c for c in cases if c.participant in train_people], slicing,
                            margin=opts.margin)
    validation = [c for c in cases if c.participant in val_people]
    torch.manual_seed(opts.seed)
    encoder_state = load_encoder_state(opts.encoder_weights, opts.encoder) \
        if opts.encoder_weights else None
    try:
        model = build_model(opts.decoder, opts.encoder, in_channels=len(slicing.channels),
                            n_classes=len(labels), encoder_state=encoder_state,
                            encoder_width=opts.encoder_width)
    except ValueError as err:
        if encoder_state is None:
            raise UsageError(str(err)) from err
        raise CheckpointError(f'--encoder-weights {opts.encoder_weights}: {err}') from err
    if opts.size % model.divisor:
        raise UsageError(f'--size {opts.size} must be a multiple of {model.divisor} for '
                         f'{opts.decoder}')
    steps = opts.steps or opts.epochs * bt.epoch_steps(len(train), opts.batch_size)
    augment = None if opts.no_augment else Augment.slices(flip=opts.flip)
    settings = {'decoder': opts.decoder, 'encoder': opts.encoder,
                'encoder_width': opts.encoder_width, 'loss': opts.loss,
                'alpha': opts.alpha if opts.loss == 'dicece' else None,
                'batch_size': opts.batch_size, 'learning_rate': opts.learning_rate,
                'lr_schedule': opts.lr_schedule,
                'margin': opts.margin, 'val_fraction': opts.val_fraction, 'seed': opts.seed,
                'patience': opts.patience, 'device': device.type,
                'augment': None if augment is None else dataclasses.asdict(augment),
                'encoder_weights': opts.encoder_weights.name if opts.encoder_weights else None,
                'cases': [c.name for c in cases], 'lut': Path(lut).name,
                'torch_version': str(torch.__version__)}
    split = {'train': train_people, 'validation': val_people}
    LOGGER.info('%s/%s, %d classes, %d slices of %d participants for training, %d for '
                'validation (%s), %d steps', opts.decoder, opts.encoder, len(labels), len(train),
                len(train_people), len(val_people), ', '.join(val_people) or 'none', steps)

    def on_evaluate(model, entry, improved):
        if improved and val_people:
            partial = bt.TrainResult(state_dict={}, best_step=entry['step'], steps=entry['step'],
                                     scores={k: entry[f'miou_{k}'] for k in bt.SCORES})
            save_brainstem_net(opts.out, model, bt.checkpoint_meta(labels=labels, slicing=slicing,
                                                           split=split, result=partial,
                                                           settings=settings))

    result = bt.train_brainstem(
        model, train, validation, labels=labels, loss=opts.loss, alpha=opts.alpha, steps=steps,
        batch_size=opts.batch_size, lr=opts.learning_rate, seed=opts.seed, device=device,
        augment=augment, val_every=opts.val_every, patience=opts.patience, bf16=opts.bf16,
        on_evaluate=on_evaluate, lr_schedule=opts.lr_schedule)
    model.load_state_dict(result.state_dict)
    meta = bt.checkpoint_meta(labels=labels, slicing=slicing, split=split, result=result,
                              settings=settings)
    save_brainstem_net(opts.out, model, meta, half=opts.half_weights)
    LOGGER.info('Brainstem network written: %s (step %d of %d, validation mIoU %s)', opts.out,
                result.best_step, result.steps,
                ', '.join(f'{k} {v:.4f}' for k, v in result.scores.items()) or 'n/a')
    return 0
