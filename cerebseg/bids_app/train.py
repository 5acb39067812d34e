"""``cerebseg-train``: train cerebseg's networks on your data (the command line).

One sub-command per network family, each in its own module, each calling its trainer in
:mod:`cerebseg.training`:

* ``cerebseg-train segmentation``: :mod:`cerebseg.bids_app.train_segmentation`;
* ``cerebseg-train brainstem``: :mod:`cerebseg.bids_app.train_brainstem`;
* ``cerebseg-train registration``: :mod:`cerebseg.bids_app.train_registration`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cerebseg import __version__
from cerebseg.bids_app.parser import available_cpus
from cerebseg.errors import CerebsegError

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
    cmd.add_argument('--atlas-library', default='suit',
                     help='library whose entries are used (default: suit)')
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
    cmd.add_argument('--nthreads', type=int, default=available_cpus())
    cmd.add_argument('--random-seed', type=int, default=0)
    cmd.add_argument('-v', '--verbose', action='count', default=0)
    _add_segmentation_parser(sub)
    _add_brainstem_parser(sub)
    return parser


def _add_segmentation_parser(sub) -> None:
    from cerebseg.bids_app.parser import (FUSION_SEARCH_CHOICES, LOBULE_BORDERS_CHOICES,
                                          LOBULE_VOTES_CHOICES, nonlocal_weight_arg)
    from cerebseg.models.losses import LOSSES
    from cerebseg.models.nets3d import ARCHITECTURES, CHANNELS
    from cerebseg.models.cascade import STAGES

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
                     help='deepceres: log(((1 - mean Dice) + BCE) / 2); dicece: Dice + CE; ce: '
                          'cross-entropy alone (no Dice over the classes a patch lacks)')
    cmd.add_argument('--assets-dir', type=Path, default=None,
                     help='cerebseg assets (default: $CEREBSEG_ASSETS, then the user cache)')
    cmd.add_argument('--atlas-library', default='suit',
                     help='label protocol of the labels (and library of the prior); default: '
                          'suit, the protocol of the shipped networks (cobra, the default of '
                          'cerebseg, ships none)')
    cmd.add_argument('--simulated-prior', type=float, default=0.0, metavar='P',
                     help='probability that a patch\'s prior channels are replaced by its own '
                          'labels, randomly deformed (1-4 mm) and blurred (training.augment.'
                          'simulate_prior); default 0: the computed prior only')
    cmd.add_argument('--prepared', action='store_true',
                     help='train on the data --prepare-only cached in --work-dir as it was '
                          'prepared, whatever library made each prior (e.g. each case\'s own '
                          'leave-one-out library); a participant without it is an error')
    cmd.add_argument('--fusion-search', choices=FUSION_SEARCH_CHOICES, default='auto',
                     help='the prior\'s label fusion, as cerebseg --fusion-search (auto, the '
                          'default: the protocol\'s, as a run; 0: local voting; 1-2: non-local, '
                          'patch search of that many voxels)')
    cmd.add_argument('--fusion-nonlocal-weight', type=nonlocal_weight_arg, default='auto',
                     metavar='{auto,W}', help='as cerebseg --fusion-nonlocal-weight')
    cmd.add_argument('--lobule-borders', choices=LOBULE_BORDERS_CHOICES, default='auto',
                     help='the prior\'s lobule borders, as cerebseg --lobule-borders (auto: '
                          'the protocol\'s; the networks see the prior a run gives them)')
    cmd.add_argument('--lobule-votes', choices=LOBULE_VOTES_CHOICES, default='auto',
                     help='as cerebseg --lobule-votes')
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
    cmd.add_argument('--nthreads', type=int, default=available_cpus())
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
    from cerebseg.models.nets2d import DECODERS, ENCODERS
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
    cmd.add_argument('--nthreads', type=_positive, default=available_cpus())
    cmd.add_argument('-v', '--verbose', action='count', default=0)


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
            from cerebseg.bids_app.train_segmentation import run
        elif opts.command == 'brainstem':
            from cerebseg.bids_app.train_brainstem import run
        else:
            from cerebseg.bids_app.train_registration import run
        return run(opts)
    except CerebsegError as err:
        LOGGER.error('%s', err)
        return err.exit_code


if __name__ == '__main__':
    raise SystemExit(main())
