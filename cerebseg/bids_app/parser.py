"""Command line of the BIDS-App (BIDS-Apps spec, fMRIPrep conventions)."""
from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

from cerebseg import __version__
from cerebseg.assets import DEFAULT_LIBRARY, available_protocols

#: the choices of the prior's options, shared by ``cerebseg`` and ``cerebseg-train segmentation``
#: (the networks are trained on the prior a run gives)
FUSION_SEARCH_CHOICES = ('auto', '0', '1', '2')
LOBULE_BORDERS_CHOICES = ('auto', 'branches', 'fused')
LOBULE_VOTES_CHOICES = ('auto', 'on', 'off')


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the system has one (a SLURM
    job, ``taskset``, a container limited with ``--cpuset-cpus``), else every CPU of the host.
    ``os.cpu_count()`` counts the host's CPUs whatever the process is allowed, which would run
    as many threads on a one-CPU job as the node has."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):   # no affinity on this platform (macOS)
        return os.cpu_count() or 1


def _path_exists(value, parser, what='Path'):
    path = Path(value).expanduser().absolute()
    if not path.exists():
        hint = ''
        if os.environ.get('CEREBSEG_CONTAINER'):
            hint = ' (inside a container: is it mounted with -v/-B?)'
        parser.error(f'{what} does not exist: {path}{hint}')
    return path


def _positive(value, parser, name, kind=int):
    """``kind(value)`` if it is > 0, else a usage error naming the option."""
    try:
        num = kind(value)
    except ValueError:
        num = 0
    if num <= 0:
        parser.error(f'{name} must be a positive {"integer" if kind is int else "number"}, '
                     f'got {value!r}')
    return num


def _drop_prefix(value: str, prefix: str) -> str:
    return value[len(prefix):] if value.startswith(prefix) else value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='cerebseg',
        description='cerebseg segments the cerebellum into lobules from T1w (and T2w) MRI and '
                    'writes BIDS derivatives: label maps in native space, volumes, transforms.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    exists = partial(_path_exists, parser=parser)
    parser.add_argument('bids_dir', type=partial(exists, what='BIDS folder'),
                        help='the root of the BIDS dataset')
    parser.add_argument('output_dir', type=Path,
                        help='where derivatives go (e.g. bids_dir/derivatives/cerebseg)')
    parser.add_argument('analysis_level', choices=['participant', 'group'],
                        help='participant: segment; group: gather the volumes of all participants '
                             'into tables and a report (after the participant level)')

    sel = parser.add_argument_group('Selecting data')
    sel.add_argument('--participant-label', '--participant_label', dest='participant_label',
                     nargs='+', metavar='LABEL',
                     type=lambda s: _drop_prefix(s, 'sub-'),
                     help='participants to process (with or without "sub-"); default: all')
    sel.add_argument('--session-label', '--session_label', dest='session_label', nargs='+',
                     metavar='LABEL', type=lambda s: _drop_prefix(s, 'ses-'),
                     help='sessions to process (with or without "ses-"); default: all')
    sel.add_argument('--bids-filter-file', '--bids_filter_file', dest='bids_filter_file',
                     type=partial(exists, what='BIDS filter file'), metavar='FILE',
                     help='JSON with pybids filters for the "t1w" and "t2w" queries')
    sel.add_argument('--t1-only', action='store_true',
                     help='ignore T2w images (T1w-only mode)')
    sel.add_argument('--skip-bids-validation', '--skip_bids_validation', action='store_true',
                     help='do not validate the dataset with pybids before indexing')

    perf = parser.add_argument_group('Resources')
    perf.add_argument('--nprocs', '--n-cpus', '--nthreads', dest='nprocs', default=None,
                      type=partial(_positive, parser=parser, name='--nprocs'),
                      help='processes run at once (default: all CPUs)')
    perf.add_argument('--omp-nthreads', dest='omp_nthreads', default=None,
                      type=partial(_positive, parser=parser, name='--omp-nthreads'),
                      help='threads per process (ANTs/ITK, torch, OpenMP); default: nprocs')
    perf.add_argument('--mem-gb', '--mem_gb', dest='mem_gb', default=None,
                      type=partial(_positive, parser=parser, name='--mem-gb', kind=float),
                      help='memory limit for the scheduler (GB)')
    perf.add_argument('--plugin', '--use-plugin', dest='plugin', default=None,
                      choices=['Linear', 'MultiProc', 'SLURM', 'SLURMGraph'],
                      help='Nipype execution plugin (default: MultiProc with --nprocs > 1, '
                           'else Linear); SLURM/SLURMGraph submit the nodes as SLURM jobs')
    perf.add_argument('--plugin-args', dest='plugin_args', default=None, metavar='JSON|FILE',
                      help='arguments of the plugin: a JSON object, or a JSON or YAML file '
                           '(e.g. \'{"sbatch_args": "--partition=short --time=1:00:00"}\')')
    perf.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                      help='where torch models run (auto: CUDA when available)')

    method = parser.add_argument_group('Method')
    method.add_argument('--atlas-library', choices=available_protocols(),
                        default=DEFAULT_LIBRARY,
                        help='label protocol and its atlas library: cobra (default: CERES, 12 '
                             'lobules and the corpus medullare per side) or suit (SUIT: lobules '
                             'with the vermis apart, and 6 deep nuclei)')
    method.add_argument('--affine-fit', choices=['symmetric', 'single', 'coarse'],
                        default='symmetric',
                        help='the T1w\'s affine to MNI152NLin2009cAsym and its refinement on '
                             'cerebellum and brainstem: symmetric (default: the T1w and its '
                             'left-right mirror are both fitted and the fits averaged, so that '
                             'a mirrored head gets exactly the mirrored transform and left and '
                             'right are treated alike), single (one fit each, about 15 s '
                             'faster; a fit and its mirror\'s differ by up to 1 mm) or coarse '
                             '(one fit each, the whole-brain one from one start on 4 mm copies: '
                             'another 15 s faster, about 1 mm off; for trying out the pipeline '
                             'and its scheduling, not for volumes you report)')
    method.add_argument('--registration', choices=['torch', 'ants', 'both'], default='torch',
                        help='how library entries are registered to the subject: torch '
                             '(diffeomorphic, all entries in one batch, on --device; default), '
                             'ants (affine + SyN per entry) or both (each entry both ways, all '
                             'fused; slowest, used for silver-standard training labels)')
    method.add_argument('--fusion-search', choices=FUSION_SEARCH_CHOICES, default='auto',
                        help='each library entry votes, at each voxel, the label of its patch '
                             'that best matches the subject\'s within this many 0.5 mm voxels '
                             '(0: the patch at the same voxel, local weighted voting; 1: better '
                             'lobule boundaries on real anatomy, but a larger cerebellum with '
                             'the suit library); auto (default): what the label protocol '
                             'defines: 0 for suit, 1 for cobra, mixed half and half with local '
                             'voting (--fusion-nonlocal-weight); see the README')
    method.add_argument('--fusion-nonlocal-weight', type=nonlocal_weight_arg, default='auto',
                        metavar='{auto,W}',
                        help='with --fusion-search 1 or 2: the share W (0 to 1) of the '
                             'non-local vote in the fused probabilities, the local vote\'s '
                             'being 1 - W; auto (default): the protocol\'s (0.5 for cobra) '
                             'with --fusion-search auto, 1 (non-local only) with a number')
    method.add_argument('--outline', choices=['auto', 'tissue', 'trimmed', 'fused'],
                        default='auto',
                        help='the cerebellum\'s outline on the native grid: tissue (decided by '
                             'the bias-corrected T1w on both sides: the outline voxels that are '
                             'more CSF than tissue are background, judged again up to 3 mm '
                             'deep, and the voxels just outside '
                             'that are more tissue than CSF, facing CSF, where the fusion gives '
                             'the cerebellum a probability of 0.25 or more, are added), trimmed '
                             '(only the first half of that), fused (as the label fusion draws '
                             'it), or auto (default: what the label protocol defines; tissue '
                             'for cobra, whose manual maps label tissue only, fused for suit, '
                             'whose atlas labels the partial-volume shell; see the README)')
    method.add_argument('--lobule-borders', choices=LOBULE_BORDERS_CHOICES, default='auto',
                        help='the lobule borders: branches (each white-matter branch that '
                             'the bias-corrected T1w shows in the working box weighs the fused '
                             'probabilities of the voxels around it by the share of each lobule '
                             'it carries: borders on the subject\'s fissures), fused (as the '
                             'label fusion draws them), or auto (default: what the label '
                             'protocol defines; branches for cobra, fused for suit, which '
                             'labels no corpus medullare; see the README)')
    method.add_argument('--lobule-votes', choices=LOBULE_VOTES_CHOICES, default='auto',
                        help='with the lobule borders on the branches: an independent '
                             'population atlas (the SUIT atlas on MNI152NLin6AsymC and its '
                             'mirror, its lobules mapped onto the CERES lobules) also votes on '
                             'which lobule each branch carries (on), or not (off); auto '
                             '(default): on where the library has the votes (cobra; see the '
                             'README)')
    method.add_argument('--models', choices=['ensemble', 'unet', 'dpn', 'none'],
                        default='none',
                        help='DeepCeres lobule networks: none (default: the multi-atlas labels '
                             'are the result), the U-Net and DPN ensemble, or one of them. '
                             'With --atlas-library cobra the shipped U-Net needs a T2w and '
                             'decides the outline only (MODEL_CARD_cobra.md); the SUIT ones '
                             'do not beat the multi-atlas labels on exact-truth cases '
                             '(MODEL_CARD.md)')
    method.add_argument('--skip-brainstem', action='store_true',
                        help='do not segment the brainstem (by default every participant run '
                             'segments the cerebellum and the brainstem)')
    method.add_argument('--brainstem-method', choices=['atlas', 'network'], default='atlas',
                        help='atlas (default: the brainstem label set registered onto the '
                             'subject) or network (a 2D N-DecoNet on axial slices, trained on '
                             'atlas labels; it does not beat the atlas on exact-truth cases, '
                             'see the model card)')
    method.add_argument('--brainstem-weights', type=Path, default=None, metavar='FILE',
                        help='checkpoint of --brainstem-method network (cerebseg-train '
                             'brainstem; default: the weights that ship with cerebseg)')
    method.add_argument('--skip-cerebellum', action='store_true',
                        help='segment the brainstem only (the cerebellum\'s MNI affine is still '
                             'fitted: the brainstem uses it)')
    method.add_argument('--no-atlas-prior', action='store_true',
                        help='networks without the multi-atlas prior channel (needs weights '
                             'trained that way, see --cnn-weights)')
    method.add_argument('--cnn-weights', type=Path, default=None,
                        help='weights manifest (JSON) of the networks (default: the weights '
                             'that ship with cerebseg)')
    method.add_argument('--assets-dir', type=Path, default=None,
                        help='assets folder (default: $CEREBSEG_ASSETS, then the user cache)')
    method.add_argument('--random-seed', type=int, default=0, help='seed of every sampler')

    group = parser.add_argument_group('Group level')
    group.add_argument('--group-by', '--group_by', dest='group_by', metavar='COLUMN',
                       default=None,
                       help='a column of the dataset\'s participants.tsv (e.g. group) whose '
                            'values split the distribution plots of group_report.html')

    other = parser.add_argument_group('Other')
    other.add_argument('-w', '--work-dir', dest='work_dir', type=Path,
                       default=Path('work'),
                       help='working folder; re-running with the same one resumes')
    other.add_argument('--stop-on-first-crash', action='store_true',
                       help='stop at the first failure instead of going on with the rest')
    other.add_argument('-v', '--verbose', dest='verbose', action='count', default=0,
                       help='more messages (-vv for debugging)')
    other.add_argument('--version', action='version', version=f'cerebseg {__version__}')
    return parser


def nonlocal_weight_arg(text: str) -> str:
    """``auto`` or a number in [0, 1] (kept as text, as the run configuration stores it)."""
    if text == 'auto':
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'{text!r} is neither auto nor a number from 0 to 1')
    return repr(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the arguments (errors exit with code 2)."""
    parser = _build_parser()
    opts = parser.parse_args(argv)
    opts.output_dir = opts.output_dir.expanduser().absolute()
    opts.work_dir = opts.work_dir.expanduser().absolute()
    bids_dir = opts.bids_dir
    if opts.output_dir == bids_dir:
        parser.error(f'output_dir must not be the BIDS folder itself; use '
                     f'{bids_dir / "derivatives" / "cerebseg"}')
    if bids_dir in opts.output_dir.parents and \
            opts.output_dir.relative_to(bids_dir).parts[0] != 'derivatives':
        parser.error(f'output_dir {opts.output_dir} is inside the BIDS folder; put it under '
                     f'{bids_dir / "derivatives"} (e.g. {bids_dir / "derivatives" / "cerebseg"}) '
                     'or outside the dataset')
    if opts.work_dir == opts.output_dir or opts.output_dir in opts.work_dir.parents and \
            opts.work_dir.relative_to(opts.output_dir).parts[0].startswith('sub-'):
        parser.error('the work folder must not be the output folder or a participant folder')
    if opts.group_by and opts.analysis_level != 'group':
        parser.error('--group-by is an option of the group level: run cerebseg bids_dir '
                     'output_dir group --group-by COLUMN after the participant level')
    nprocs = opts.nprocs or available_cpus()
    opts.nprocs = nprocs
    opts.omp_nthreads = opts.omp_nthreads or nprocs
    if opts.omp_nthreads > nprocs:
        parser.error(f'--omp-nthreads ({opts.omp_nthreads}) cannot exceed --nprocs ({nprocs})')
    if opts.plugin_args is not None:
        try:
            opts.plugin_args = json.dumps(read_plugin_args(opts.plugin_args), sort_keys=True)
        except ValueError as err:
            parser.error(f'--plugin-args: {err}')
    return opts


def read_plugin_args(value: str) -> dict:
    """``--plugin-args``: a JSON object, or the path of a JSON or YAML file holding one
    (ValueError naming what is wrong)."""
    path = Path(value).expanduser()
    text, what, kind = value, 'the argument', 'a JSON object'
    load, error = json.loads, json.JSONDecodeError
    if path.is_file():
        text, what = path.read_text(), str(path)
        if path.suffix in ('.yml', '.yaml'):
            try:
                import yaml
            except ImportError as err:
                raise ValueError(f'{path} is YAML but PyYAML is not installed; '
                                 'give JSON') from err
            load, error, kind = yaml.safe_load, yaml.YAMLError, 'a YAML mapping'
    try:
        data = load(text)
    except error as err:
        raise ValueError(f'{what} is neither a file nor {kind} ({err})') from err
    if not isinstance(data, dict):
        raise ValueError(f'{what} must be {kind} of plugin arguments')
    return data
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f'{what} is neither a file nor a JSON object ({err})') from err
    if not isinstance(data, dict):
        raise ValueError(f'{what} must be a JSON object of plugin arguments')
    return data
