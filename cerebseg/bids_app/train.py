"""``cerebseg-train``: train cerebseg's networks on your data.

``cerebseg-train registration BIDS_DIR --out regnet.pt`` trains the registration network
(:mod:`cerebseg.models.regnet`) without labels, on the T1w images of a BIDS dataset placed
affinely in the working grid and on the entries of an atlas library. Prepared volumes are cached
in ``--work-dir``; the checkpoint is written every ``--checkpoint-every`` steps and a re-run with
``--resume`` continues from it.

``cerebseg-train segmentation BIDS_DIR --labels DERIVATIVES --out model.pt`` trains one network
of the DeepCeres cascade (``--stage hemisphere`` at 1 mm or ``--stage lobules`` at 0.5 mm,
``--architecture unet`` or ``dpn``, ``--inputs T1w [T2w] [prior]``) on reference labels
(``dseg``) in a derivatives folder (:mod:`cerebseg.bids_app.training_data`). ``--out`` holds the
best checkpoint by validation Dice; ``--out`` + ``.state.pt`` the last epoch and everything
needed to resume exactly (``--resume``).

``cerebseg-train brainstem --work-dir WORK [WORK ...] --out net.pt`` trains a 2D brainstem
network (:mod:`cerebseg.models.brainstem`, :mod:`cerebseg.models.brainstem_training`) on the
axial slices of the brainstem box of every participant run in cerebseg work folders, against the
atlas labels of the run (cerebseg's diffeomorphic registration of the brainstem label set);
``--bids BIDS --assets-dir ASSETS`` runs ``cerebseg ... participant --skip-cerebellum`` first to
make them. ``--out`` holds the best network by validation mIoU (held-out participants).
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
    _add_segmentation_parser(sub)
    _add_brainstem_parser(sub)
    return parser


def _add_segmentation_parser(sub) -> None:
    from cerebseg.models.losses import LOSSES
    from cerebseg.models.segmentation import ARCHITECTURES, CHANNELS
    from cerebseg.models.training import STAGES

    cmd = sub.add_parser('segmentation', help='a network of the DeepCeres cascade')
    cmd.add_argument('bids_dir', type=Path, help='BIDS dataset with the T1w (and T2w) images')
    cmd.add_argument('--labels', type=Path, required=True,
                     help='derivatives folder with one reference dseg per T1w')
    cmd.add_argument('--out', type=Path, default=None,
                     help='checkpoint to write (.pt); required unless --prepare-only')
    cmd.add_argument('--prepare-only', action='store_true',
                     help='only prepare (and cache in --work-dir) the training data: '
                          'preprocessing, prior, labels on the working grid')
    cmd.add_argument('--stage', choices=STAGES, default='lobules',
                     help='hemisphere (background/left/right, 1 mm) or lobules (0.5 mm)')
    cmd.add_argument('--architecture', choices=sorted(ARCHITECTURES), default='unet')
    cmd.add_argument('--features', type=int, nargs='+', default=None,
                     help='widths per level (default: the architecture\'s)')
    cmd.add_argument('--inputs', nargs='+', choices=CHANNELS, default=['T1w', 'prior'],
                     help='input channels (T1w required)')
    cmd.add_argument('--no-prior-residual', action='store_true',
                     help='the prior is an input channel only (default: its log-probabilities '
                          'are also added to the logits, the network learns corrections)')
    cmd.add_argument('--loss', choices=sorted(LOSSES), default='deepceres',
                     help='deepceres: log(((1 - mean Dice) + BCE) / 2); dicece: Dice + CE')
    cmd.add_argument('--assets-dir', type=Path, default=None,
                     help='cerebseg assets (default: $CEREBSEG_ASSETS, then the user cache)')
    cmd.add_argument('--atlas-library', default='suit',
                     help='label protocol of the labels (and library of the prior)')
    cmd.add_argument('--participant-label', nargs='+', default=None,
                     help='participants to train on (default: all but validation/excluded)')
    cmd.add_argument('--exclude-label', nargs='+', default=[],
                     help='participants to leave out (e.g. a test set)')
    cmd.add_argument('--validation-label', nargs='+', default=[],
                     help='participants segmented and scored (Dice) after every epoch')
    cmd.add_argument('--epochs', type=int, default=20)
    cmd.add_argument('--steps-per-epoch', type=int, default=50)
    cmd.add_argument('--patch-size', type=int, default=None,
                     help='cubic patch side in voxels (default 64 hemisphere, 96 lobules)')
    cmd.add_argument('--batch-size', type=int, default=2)
    cmd.add_argument('--learning-rate', type=float, default=1e-3)
    cmd.add_argument('--half', action='store_true', help='store the weights as float16')
    cmd.add_argument('--bf16', action='store_true',
                     help='bfloat16 autocast on CPU (always on a GPU)')
    cmd.add_argument('--work-dir', type=Path, default=Path('work_cerebseg_train'),
                     help='preprocessing and prior of each participant (a cerebseg work '
                          'folder can be shared)')
    cmd.add_argument('--resume', action='store_true', help='continue from --out.state.pt')
    cmd.add_argument('--init', type=Path, default=None,
                     help='start from this checkpoint (same architecture and stage; e.g. a '
                          'T1w+prior network to fine-tune with --inputs T1w T2w prior: the new '
                          'channels start at zero weight)')
    cmd.add_argument('--device', default='auto', help='auto, cpu or cuda[:N]')
    cmd.add_argument('--nthreads', type=int, default=os.cpu_count() or 1)
    cmd.add_argument('--random-seed', type=int, default=0)
    cmd.add_argument('-v', '--verbose', action='count', default=0)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f'must be in [0, 1), got {value}')
    return value


def _label(text: str) -> str:
    return text.removeprefix('sub-')


def _add_brainstem_parser(sub) -> None:
    from cerebseg.models.brainstem import DECODERS, ENCODERS
    from cerebseg.models.losses import ALL_LOSSES

    cmd = sub.add_parser(
        'brainstem', help='a 2D brainstem network (N-DecoNet and the decoders it is compared '
        'with) on axial slices of the brainstem box',
        description='Train a 2D brainstem network on axial slices of the 1 mm brainstem box. '
        'The training labels are those of cerebseg\'s atlas method: the brainstem label set of '
        'the assets registered onto each T1w by cerebseg\'s diffeomorphic (torch) registration '
        '(node brainstem_wf.atlas of a participant run), so the network learns to reproduce '
        'that registration. The split into training and validation is by participant.')
    data = cmd.add_mutually_exclusive_group(required=True)
    data.add_argument('--work-dir', type=Path, nargs='+', default=None, metavar='WORK',
                      help='work folders (-w) of cerebseg participant runs with the brainstem; '
                           'every WORK/cerebseg_sub_<label>_wf with preproc_wf/to_bs_grid/'
                           't1_box.nii.gz and brainstem_wf/atlas/brainstem_dseg.nii.gz is used')
    data.add_argument('--bids', type=Path, default=None, metavar='BIDS',
                      help='BIDS dataset: run `cerebseg BIDS ... participant --skip-cerebellum` '
                           '(into --prep-dir) for the participants that have no labels yet, '
                           'then train on its work folder')
    cmd.add_argument('--out', type=Path, required=True, metavar='CHECKPOINT',
                     help='checkpoint to write (.pt); rewritten at every better validation '
                          'score')
    cmd.add_argument('--participant-label', '--participant_label', nargs='+', type=_label,
                     default=None, metavar='LABEL', help='participants to use (default: all)')
    cmd.add_argument('--exclude-label', nargs='+', type=_label, default=[], metavar='LABEL',
                     help='participants to leave out (e.g. a test set)')
    cmd.add_argument('--assets-dir', type=Path, default=None,
                     help='cerebseg assets with the brainstem label set: its lookup table names '
                          'the classes, and --bids runs use them (default: $CEREBSEG_ASSETS, '
                          'then the user cache)')
    cmd.add_argument('--lut', type=Path, default=None,
                     help='lookup table of the labels (default: the assets\' '
                          'seg-brainstem_dseg.tsv)')
    cmd.add_argument('--prep-dir', type=Path, default=Path('work_cerebseg_train/brainstem'),
                     help='with --bids: work (PREP/work) and output (PREP/derivatives) folders '
                          'of the participant runs')
    cmd.add_argument('--skip-bids-validation', action='store_true',
                     help='with --bids: passed on to cerebseg')
    cmd.add_argument('--decoder', choices=sorted(DECODERS), default='ndeconet')
    cmd.add_argument('--encoder', choices=sorted(ENCODERS), default='resnet34')
    cmd.add_argument('--encoder-width', type=_positive, default=64,
                     help='width of the encoder\'s first stage (64: torchvision\'s ResNet, '
                          'the paper\'s; 16: a sixteenth of the parameters, the shipped '
                          'weights)')
    cmd.add_argument('--encoder-weights', type=Path, default=None,
                     help='local torchvision state dict of the encoder (e.g. ImageNet '
                          'resnet34-b627a593.pth; default: random initialisation)')
    cmd.add_argument('--loss', choices=sorted(ALL_LOSSES), default='dicece')
    cmd.add_argument('--alpha', type=float, default=0.1,
                     help='dicece: weight of the Dice side, alpha * Dice + (1 - alpha) * CE '
                          '(default 0.1, the paper\'s)')
    cmd.add_argument('--size', type=_positive, default=96,
                     help='side of the network input (a multiple of 32; 224 as the paper, '
                          'default 96 for a CPU)')
    cmd.add_argument('--crop', type=_positive, default=64,
                     help='side of the in-plane window cut around the middle of the box '
                          '(voxels, 1 mm), resized to --size')
    cmd.add_argument('--context', type=int, default=0, choices=range(6), metavar='K',
                     help='2.5D: K neighbouring slices on each side as extra input channels '
                          '(2K + 1 channels; default 0)')
    cmd.add_argument('--margin', type=int, default=2,
                     help='empty slices kept beyond each end of the labelled ones')
    cmd.add_argument('--epochs', type=_positive, default=20,
                     help='passes over the training slices (default 20)')
    cmd.add_argument('--steps', type=_positive, default=None,
                     help='optimisation steps (overrides --epochs)')
    cmd.add_argument('--batch-size', type=_positive, default=16)
    cmd.add_argument('--learning-rate', type=float, default=1e-3)
    cmd.add_argument('--lr-schedule', choices=['cosine', 'constant'], default='cosine',
                     help='learning rate over the steps: cosine (default; down to a hundredth) '
                          'or constant')
    cmd.add_argument('--val-fraction', type=_fraction, default=0.2,
                     help='fraction of the participants held out for validation (0: none, the '
                          'last weights are written)')
    cmd.add_argument('--val-every', type=_positive, default=None,
                     help='steps between validations (default: one epoch)')
    cmd.add_argument('--patience', type=int, default=5,
                     help='validations without a better mIoU before stopping (0: never)')
    cmd.add_argument('--no-augment', action='store_true', help='no augmentation')
    cmd.add_argument('--flip', type=float, default=0.0,
                     help='probability of a left-right flip (left/right labels swapped; '
                          'default 0)')
    cmd.add_argument('--half-weights', action='store_true',
                     help='store the weights as float16 (half the file; the shipped weights)')
    cmd.add_argument('--seed', type=int, default=0,
                     help='seed of the split, the initialisation and the sampling')
    cmd.add_argument('--device', default='auto', help='auto, cpu or cuda[:N]')
    cmd.add_argument('--bf16', action='store_true',
                     help='bfloat16 autocast on CPU (always on a GPU)')
    cmd.add_argument('--nthreads', type=_positive, default=os.cpu_count() or 1)
    cmd.add_argument('-v', '--verbose', action='count', default=0)


def _brainstem_runs(opts) -> list[Path]:
    """Run the brainstem-only pipeline for the participants of ``--bids`` that have no labels
    in ``--prep-dir`` yet; returns the work folder."""
    import subprocess

    from cerebseg.models.brainstem_training import DSEG_BOX

    if not opts.bids.is_dir():
        raise UsageError(f'BIDS folder not found: {opts.bids}')
    wanted = opts.participant_label or sorted(
        p.name[4:] for p in opts.bids.glob('sub-*') if p.is_dir())
    wanted = [p for p in wanted if p not in opts.exclude_label]
    work, out = opts.prep_dir / 'work', opts.prep_dir / 'derivatives'
    todo = [p for p in wanted
            if not any((d / DSEG_BOX).is_file() for d in work.glob(f'cerebseg_sub_{p}_*wf'))]
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


def train_brainstem(opts) -> int:
    import dataclasses

    import torch

    from cerebseg.errors import BadDataError
    from cerebseg.models import brainstem_training as bt
    from cerebseg.models.brainstem import build_model, save_model
    from cerebseg.models.inference import resolve_device
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
    slicing = bt.Slicing(size=opts.size, context=opts.context, crop=opts.crop)
    train = bt.SliceDataset([c for c in cases if c.participant in train_people], slicing,
                            margin=opts.margin)
    validation = [c for c in cases if c.participant in val_people]
    torch.manual_seed(opts.seed)
    model = build_model(opts.decoder, opts.encoder, in_channels=len(slicing.channels),
                        n_classes=len(labels), encoder_weights=opts.encoder_weights,
                        encoder_width=opts.encoder_width)
    if opts.size % model.divisor:
        raise UsageError(f'--size {opts.size} must be a multiple of {model.divisor} for '
                         f'{opts.decoder}')
    steps = opts.steps or opts.epochs * bt.epoch_steps(len(train), opts.batch_size)
    augment = None if opts.no_augment else bt.Augment(flip=opts.flip)
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
            save_model(opts.out, model, bt.checkpoint_meta(labels=labels, slicing=slicing,
                                                           split=split, result=partial,
                                                           settings=settings))

    result = bt.train_brainstem(
        model, train, validation, labels=labels, loss=opts.loss, alpha=opts.alpha, steps=steps,
        batch_size=opts.batch_size, lr=opts.learning_rate, seed=opts.seed, device=device,
        augment=augment, val_every=opts.val_every, patience=opts.patience, bf16=opts.bf16,
        on_evaluate=on_evaluate, lr_schedule=opts.lr_schedule)
    model.load_state_dict(result.state_dict)
    save_model(opts.out, model, bt.checkpoint_meta(labels=labels, slicing=slicing, split=split,
                                                   result=result, settings=settings),
               half=opts.half_weights)
    LOGGER.info('Brainstem network written: %s (step %d of %d, validation mIoU %s)', opts.out,
                result.best_step, result.steps,
                ', '.join(f'{k} {v:.4f}' for k, v in result.scores.items()) or 'n/a')
    return 0


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


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + '.state.pt')


def train_segmentation(opts) -> int:
    import dataclasses

    import torch

    from cerebseg.assets.locate import load_assets
    from cerebseg.bids_app.bids import collect_inputs
    from cerebseg.bids_app.run import _library_paths
    from cerebseg.bids_app.training_data import find_label_file, prepare_subject
    from cerebseg.models import segmentation as seg
    from cerebseg.models import training as tr
    from cerebseg.models.inference import resolve_device
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
    library = _library_paths(assets, opts.atlas_library)
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
    if not train_runs:
        raise UsageError(f'No T1w to train on in {opts.bids_dir} with the participant '
                         'selection given.')

    def prepare(run_list):
        return [prepare_subject(r, find_label_file(opts.labels, r), assets, library,
                                opts.work_dir, omp_nthreads=opts.nthreads,
                                seed=opts.random_seed) for r in run_list]

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
            init = seg.read_checkpoint(opts.init)
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
            adapted = seg.transfer_weights(init, model, inputs, len(stage_labels) - 1)
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
            seg.save_checkpoint(opts.out, model, architecture=arch, inputs=inputs,
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
        augment=tr.Augment(spacing=spacing), bf16=opts.bf16, state=state, on_epoch=on_epoch)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault('NIPYPE_NO_ET', '1')
    opts = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if opts.verbose > 1 else logging.INFO,
                        format='%(asctime)s %(name)s %(levelname)s: %(message)s',
                        stream=sys.stderr)
    if opts.command == 'segmentation':
        from nipype import config as ncfg
        from nipype import logging as nlogging

        level = 'INFO' if opts.verbose > 1 else 'WARNING'
        ncfg.update_config({'logging': {'workflow_level': level, 'interface_level': level,
                                        'utils_level': level}})
        nlogging.update_logging(ncfg)
    try:
        if opts.command == 'segmentation':
            return train_segmentation(opts)
        if opts.command == 'brainstem':
            return train_brainstem(opts)
        return train_registration(opts)
    except CerebsegError as err:
        LOGGER.error('%s', err)
        return err.exit_code


if __name__ == '__main__':
    raise SystemExit(main())
