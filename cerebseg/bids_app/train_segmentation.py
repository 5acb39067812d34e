"""``cerebseg-train segmentation BIDS_DIR --labels DERIVATIVES --out model.pt``: train one
network of the DeepCeres cascade (``--stage hemisphere`` at 1 mm or ``--stage lobules`` at 0.5
mm, ``--architecture unet`` or ``dpn``, ``--inputs T1w [T2w] [prior]``; trainer
:mod:`cerebseg.training.cascade`) on reference labels (``dseg``) in a derivatives folder
(:mod:`cerebseg.training.data`). ``--out`` holds the best checkpoint by validation Dice;
``--out`` + ``.state.pt`` the last epoch and everything needed to resume exactly
(``--resume``).
"""
from __future__ import annotations

import logging
from pathlib import Path


from cerebseg.errors import UsageError

LOGGER = logging.getLogger('cerebseg.train')


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + '.state.pt')


def run(opts) -> int:
    """``cerebseg-train segmentation``: train one network of the DeepCeres cascade."""
    import dataclasses

    import torch

    from cerebseg.assets.locate import load_assets
    from cerebseg.bids_app.bids import collect_inputs
    from cerebseg.bids_app.metadata import fusion_settings, lobule_branches
    from cerebseg.models import checkpoint as ckpt
    from cerebseg.models import nets3d as seg
    from cerebseg.models.inference import resolve_device
    from cerebseg.training import cascade as tr
    from cerebseg.training.augment import Augment
    from cerebseg.training.data import find_label_file, prepare_subject
    from cerebseg.utils.labels import read_lut

    for path, what in ((opts.bids_dir, 'BIDS folder'), (opts.labels, 'labels folder')):
        if not path.is_dir():
            raise UsageError(f'{what} not found: {path}')
    if opts.out is None and not opts.prepare_only:
        raise UsageError('--out is required (or --prepare-only)')
    try:
        inputs = seg.check_inputs(opts.inputs)
        device = resolve_device(opts.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    torch.set_num_threads(max(opts.nthreads, 1))
    assets = load_assets(opts.assets_dir)
    library = assets.library_paths(opts.atlas_library)
    labels = read_lut(library['lut'])
    excluded = set(opts.exclude_label) | set(opts.validation_label)
    runs = collect_inputs(opts.bids_dir, opts.participant_label or (), t1_only='T2w' not in inputs,
                          validate=False)
    train_runs = [r for r in runs if r.subject not in excluded]
    val_runs = collect_inputs(opts.bids_dir, opts.validation_label, t1_only='T2w' not in inputs,
                              validate=False) if opts.validation_label else []
    if 'T2w' in inputs:
        missing = [r.label for r in train_runs + val_runs if not r.t2w]
        if missing:
            raise UsageError(f'--inputs has T2w but {missing} have no T2w; leave them out '
                             '(--exclude-label) or drop T2w from --inputs.')
    if not 0 <= opts.simulated_prior <= 1:
        raise UsageError(f'--simulated-prior is a probability, not {opts.simulated_prior}')
    if opts.simulated_prior and 'prior' not in inputs:
        raise UsageError('--simulated-prior needs the prior among --inputs')
    if not train_runs:
        raise UsageError(f'No T1w to train on in {opts.bids_dir} with the participant '
                         'selection given.')

    try:   # the prior a run with these options gives the networks
        prior = {**fusion_settings(opts, library), 'branches': lobule_branches(opts, library)}
    except ValueError as err:
        raise UsageError(str(err)) from err

    def prepare(run_list):
        return [prepare_subject(r, find_label_file(opts.labels, r), assets, library,
                                opts.work_dir, omp_nthreads=opts.nthreads,
                                seed=opts.random_seed, prior=prior, prepared=opts.prepared)
                for r in run_list]

    if opts.prepare_only:
        subjects = prepare(train_runs + val_runs)
        LOGGER.info('Prepared %d T1w in %s', len(subjects), opts.work_dir)
        return 0
    factor = 2 if opts.stage == 'hemisphere' else 1
    spacing = float(assets.manifest['grid']['spacing']) * factor
    pairs = {}
    stage_labels = labels
    for split, run_list in (('train', train_runs), ('validation', val_runs)):
        pairs[split] = []
        for subject in prepare(run_list):
            image, target, stage_labels = tr.stage_arrays(subject, opts.stage, inputs, labels,
                                                          factor)
            pairs[split].append((image, target))
    patch = opts.patch_size or (64 if opts.stage == 'hemisphere' else 96)
    n_in = seg.n_input_channels(inputs, len(stage_labels) - 1)
    config = {'features': opts.features} if opts.features else {}
    if 'prior' in inputs and not opts.no_prior_residual:
        config['prior_channels'] = len(stage_labels) - 1
    state = None
    state_file = _state_path(opts.out)
    if opts.resume and state_file.is_file():
        saved = torch.load(state_file, map_location='cpu', weights_only=True)
        model = seg.build_model(saved['architecture'], **saved['config'])
        model.load_state_dict(saved['weights'], strict=True)
        state = tr.TrainState(**saved['state'])
        LOGGER.info('Resuming from %s after epoch %d', state_file, state.epoch)
    else:
        if opts.resume:
            LOGGER.warning('No %s to resume from; starting afresh', state_file)
        arch = opts.architecture
        init = None
        if opts.init:
            init = ckpt.read_cascade_checkpoint(opts.init)
            if init['stage'] != opts.stage or init['labels'] != [list(x) for x in stage_labels]:
                raise UsageError(f'--init {opts.init} is a {init["stage"]} network with other '
                                 'labels; it cannot start this one')
            arch = init['architecture']
            config = {k: v for k, v in init['config'].items()
                      if k not in ('in_channels', 'out_channels')}
            if 'prior' not in inputs:
                config['prior_channels'] = 0
        model = seg.build_model(arch, n_in, len(stage_labels), **config)
        if init is not None:
            adapted = tr.transfer_weights(init, model, inputs, len(stage_labels) - 1)
            LOGGER.info('Started from %s (%s; adapted: %s)', opts.init,
                        '+'.join(init['inputs']), ', '.join(adapted) or 'none')
    arch_name = next(k for k, v in seg.ARCHITECTURES.items() if isinstance(model, v))
    LOGGER.info('%s %s network, inputs %s (%d channels), %d classes, %d parameters; '
                '%d training and %d validation T1w', arch_name, opts.stage,
                '+'.join(inputs), n_in, len(stage_labels), seg.count_parameters(model),
                len(pairs['train']), len(pairs['validation']))
    training = {'bids_dir': opts.bids_dir.name, 'labels_dir': opts.labels.name,
                'train': [r.label for r in train_runs],
                'validation': [r.label for r in val_runs], 'loss': opts.loss,
                'patch_size': patch, 'batch_size': opts.batch_size,
                'learning_rate': opts.learning_rate, 'steps_per_epoch': opts.steps_per_epoch,
                'seed': opts.random_seed, 'device': device.type,
                'prior': {'fusion_search': prior['search'],
                          'fusion_nonlocal_weight': prior['nonlocal_weight'],
                          'levels_matched': bool(prior['white_labels']),
                          'lobule_borders': 'branches' if prior['branches'] else 'fused',
                          'lobule_votes': bool(prior['branches'] and
                                               prior['branches'].get('votes'))},
                'simulated_prior': opts.simulated_prior,
                'init': opts.init.name if opts.init else None,
                'torch_version': str(torch.__version__)}

    def on_epoch(model, state, improved):
        arch = arch_name
        tmp = state_file.with_name(state_file.name + '.tmp')
        state_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({'architecture': arch, 'config': model.config,
                    'weights': model.state_dict(), 'state': dataclasses.asdict(state)}, tmp)
        tmp.replace(state_file)
        if improved:
            ckpt.save_cascade_net(opts.out, model, architecture=arch, inputs=inputs,
                                stage=opts.stage, labels=stage_labels, spacing=spacing,
                                protocol=opts.atlas_library, half=opts.half,
                                training=dict(training, epoch=state.epoch, step=state.step,
                                              history=state.history,
                                              best_validation_dice=state.best
                                              if state.best >= 0 else None))
            LOGGER.info('Checkpoint written: %s (epoch %d)', opts.out, state.epoch)

    tr.train_segmentation(
        model, pairs['train'], pairs['validation'], labels=stage_labels,
        n_mr=sum(c != 'prior' for c in inputs), epochs=opts.epochs,
        steps_per_epoch=opts.steps_per_epoch, patch=patch, batch=opts.batch_size,
        lr=opts.learning_rate, loss=opts.loss, seed=opts.random_seed, device=device,
        augment=Augment.patches(spacing=spacing, simulated_prior=opts.simulated_prior),
        bf16=opts.bf16, state=state, on_epoch=on_epoch)
    return 0
