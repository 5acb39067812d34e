"""``cerebseg bids_dir output_dir participant|group``: parse, check, build, run, finalize."""
from __future__ import annotations

import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

LOGGER = logging.getLogger('cerebseg.cli')
IMPORTANT = 25
logging.addLevelName(IMPORTANT, 'IMPORTANT')


def _setup_logging(verbose: int) -> None:
    level = {0: IMPORTANT, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(name)s %(levelname)s: %(message)s',
                                           '%y%m%d-%H:%M:%S'))
    root = logging.getLogger('cerebseg')
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ('nipype.workflow', 'nipype.interface', 'nipype.utils'):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO if verbose > 1 else logging.WARNING)


def _set_environment(omp_nthreads: int) -> None:
    """Process-wide settings, made at run time (never at import)."""
    from cerebseg.utils.memory import bound_heap
    from cerebseg.utils.registration import set_itk_environment

    os.environ['NIPYPE_NO_ET'] = '1'
    os.environ['OMP_NUM_THREADS'] = str(omp_nthreads)
    set_itk_environment(omp_nthreads)
    bound_heap()   # (this process and the workers it starts)


_REGISTRATION_TEXT = {
    'ants': 'ANTs affine (2 mm) + SyN (Mattes mutual information, 40x20x0 iterations at 4/2/1 '
            'mm) of every library entry to the subject, masked to the entry field of view; '
            'labels carried with genericLabel interpolation.',
    'torch': 'cerebseg torch registration of all library entries in one batch: affine, then a '
             'diffeomorphic stationary velocity field (scaling and squaring) at 4 and 2 mm, '
             'squared local normalised cross-correlation measured in each entry\'s own space '
             'over the voxels where it has data (the subject read into the entry), plus '
             'diffusion regularisation, Adam; the entry brought onto the subject by the '
             'inverse transform, labels by nearest neighbour.',
}
_REGISTRATION_TEXT['both'] = ('Every library entry registered twice, and all warped entries '
                              'fused. (1) ' + _REGISTRATION_TEXT['torch'] + ' (2) '
                              + _REGISTRATION_TEXT['ants'])


def _cnn_meta(cnn: dict) -> dict:
    """What the sidecar says about the networks (from their self-describing checkpoints)."""
    from cerebseg.models.segmentation import read_checkpoint
    from cerebseg.utils.images import sha256sum

    stages = {}
    for stage in ('hemisphere', 'lobules'):
        nets = []
        for path, arch in zip(cnn[stage]['files'], cnn[stage]['architectures']):
            meta = read_checkpoint(path)
            train = meta.get('training', {})
            nets.append({'File': Path(path).name, 'Architecture': arch,
                         'Sha256': sha256sum(path),
                         'TrainingSteps': train.get('step'),
                         'TrainingData': train.get('bids_dir'),
                         'ValidationDice': train.get('best_validation_dice')})
        stages[stage.capitalize()] = {'Inputs': cnn[stage]['inputs'], 'Networks': nets}
    return {'Name': 'DeepCeres cascade: hemisphere network (background/left/right cerebellum), '
                    'then the lobule network(s) at 0.5 mm inside its mask; several lobule '
                    'networks are averaged (ensemble) and their disagreement is the '
                    'uncertainty map', 'Inputs': cnn['variant'], **stages}


def _dseg_meta(run, library: dict, bids_dir: Path, cfg, cnn: dict | None = None) -> dict:
    from cerebseg import __version__

    def bids_uri(path):
        return f'bids:raw:{Path(path).relative_to(bids_dir).as_posix()}'

    sources = [bids_uri(run.t1w)] + ([bids_uri(run.t2w)] if run.t2w else [])
    meta = {
        'Description': 'Cerebellar lobules and deep nuclei (label protocol: '
                       f'{library["name"]}) by '
                       + ('the DeepCeres CNN cascade with a multi-atlas prior.' if cnn else
                          'multi-atlas segmentation.'),
        'Sources': sources,
        'Mode': 'T1w+T2w' if run.t2w else 'T1w',
        'Method': {
            'Name': 'multi-atlas registration and locally weighted majority voting',
            'Preprocessing': 'N4 bias correction and non-local means denoising (ANTs) in native '
                             'space; affine registration to MNI152NLin2009cAsym; T2w rigidly to '
                             'T1w; 0.5 mm box around cerebellum and brainstem; N4 in the box; '
                             'intensities scaled so that the 2nd/98th foreground percentiles '
                             'are 0/1.',
            'Registration': _REGISTRATION_TEXT[cfg.registration],
            'Fusion': 'locally weighted voting: weight = 1/(mean squared intensity difference '
                      'over a 5x5x5 patch + 1e-3), averaged over T1w and T2w where the entry '
                      'has both.',
            'NativeSpace': 'per-label probabilities resampled linearly through the inverse '
                           'affine, then the most probable label.',
        },
        'AtlasLibrary': {'Name': library['name'], 'Citation': library['citation'],
                         'Licence': library['licence'],
                         'Entries': [e['name'] for e in library['entry_info']]},
        'LookupTable': 'seg-cerebellum_dseg.tsv',
        'IntracranialVolumeMethod': 'eTIV-style: volume of the MNI152NLin2009cAsym brain mask '
                                    'times the determinant of the native-to-MNI affine '
                                    '(Buckner et al. 2004).',
        'SoftwareVersion': f'cerebseg {__version__}',
        'RandomSeed': cfg.random_seed,
    }
    if cnn:
        meta['Method']['Networks'] = _cnn_meta(cnn)
        meta['Method']['NativeSpace'] = meta['Method']['NativeSpace'].replace(
            'per-label probabilities', 'per-label ensemble probabilities')
    return meta


def _library_paths(assets, name: str) -> dict:
    lib = assets.library(name)
    entries = []
    for e in lib['entries']:
        entries.append({k: str(assets.path(v)) for k, v in e['files'].items()})
    return {'name': name, 'entries': entries, 'n_labels': lib['n_labels'],
            'lut': str(assets.path(lib['lut'])), 'citation': lib['citation'],
            'licence': lib['licence'], 'entry_info': lib['entries']}


def _brainstem_paths(assets, cfg) -> dict | None:
    """The brainstem assets with absolute paths; None with --skip-brainstem, or (with a
    warning) when the assets were built without them."""
    from cerebseg.errors import MissingAssetError

    if cfg.skip_brainstem:
        return None
    try:
        section = assets.brainstem()
    except MissingAssetError as err:
        LOGGER.warning('Brainstem skipped: %s Or pass --skip-brainstem to silence this.', err)
        return None
    if section.get('restricted'):
        LOGGER.warning('The brainstem label set includes the Brainstem Navigator (%s): its '
                       'licence forbids sharing the assets or anything derived from them; keep '
                       'this run\'s brainstem outputs within your organisation.',
                       section.get('navigator'))
    out = {'t1w': str(assets.path(section['t1w'])), 'dseg': str(assets.path(section['dseg'])),
           'lut': str(assets.path(section['lut'])), 'n_labels': section['n_labels'],
           'grid': section['grid'], 'description': section['description'],
           'citation': section['citation'], 'licence': section['licence'],
           'restricted': bool(section.get('restricted')), 'method': cfg.brainstem_method}
    if cfg.brainstem_method == 'network':
        out['weights'], out['network'] = _brainstem_network(cfg, out['lut'])
    return out


def _brainstem_network(cfg, lut: str) -> tuple[str, dict]:
    """The checkpoint of --brainstem-method network and a summary of it, checked against the
    label set before any work starts (CheckpointError: exit 126)."""
    from cerebseg.models.brainstem import DEFAULT_WEIGHTS, read_model_meta
    from cerebseg.models.segmentation import CheckpointError
    from cerebseg.utils.native import read_lut_tsv

    path = Path(cfg.brainstem_weights) if cfg.brainstem_weights else DEFAULT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f'brainstem network weights not found: {path}; pass '
                              '--brainstem-weights FILE (cerebseg-train brainstem) or use '
                              '--brainstem-method atlas')
    meta = read_model_meta(path)   # no network built here: see read_model_meta
    names = [r['name'] for r in read_lut_tsv(lut)]
    if list(meta['labels']) != names:
        raise CheckpointError(f'{path} was trained on other brainstem labels than the '
                              f'{len(names)} of the assets ({lut}); train weights on this label '
                              'set (cerebseg-train brainstem) or use --brainstem-method atlas')
    cfg_ = meta['config']
    extra = meta.get('meta') or {}
    return str(path), {'Decoder': cfg_['decoder'], 'Encoder': cfg_['encoder'],
                       'EncoderWidth': cfg_.get('encoder_width', 64),
                       'Inputs': meta['channels'], 'Slicing': extra.get('slicing'),
                       'Weights': path.name, 'LabelSource': extra.get('label_source')}


def _brainstem_meta(run, brainstem: dict, bids_dir: Path, cfg) -> dict:
    from cerebseg import __version__

    sources = [f'bids:raw:{Path(run.t1w).relative_to(bids_dir).as_posix()}']
    method = {
        'Name': 'single-atlas registration (the brainstem label set of the assets)',
        'Preprocessing': 'the cerebellum\'s MNI152NLin2009cAsym affine (refined on '
                         'cerebellum and brainstem); 1 mm box around the brainstem; N4 in '
                         'the box; 2nd/98th foreground percentiles scaled to 0/1.',
        'Registration': 'the label-set template (MNI152NLin2009cAsym brain on the box) onto '
                        'the subject: affine, then a diffeomorphic stationary velocity field '
                        'at 4, 2 and 1 mm (local normalised cross-correlation on the '
                        'subject\'s grid); labels warped as probabilities.',
        'NativeSpace': 'per-label probabilities resampled linearly through the inverse '
                       'affine; the outline first (brainstem where its labels together '
                       'outweigh the background), then its most probable label.',
    }
    if brainstem.get('method') == 'network':
        method['Name'] = '2D network on axial slices of the brainstem box'
        method['Network'] = brainstem['network']
        method.pop('Registration')
    return {
        'Description': 'Brainstem parts (midbrain, pons, medulla; grey and white matter) and '
                       'nuclei from an atlas label set built from open atlases, by '
                       + ('a 2D network trained on its registrations.'
                          if brainstem.get('method') == 'network' else 'registration.'),
        'Sources': sources,
        'Mode': 'T1w',
        'Method': method,
        'LabelSet': {'Description': brainstem['description'], 'Citation': brainstem['citation'],
                     'Licence': brainstem['licence'], 'Restricted': brainstem['restricted']},
        'LookupTable': 'seg-brainstem_dseg.tsv',
        'SoftwareVersion': f'cerebseg {__version__}',
        'RandomSeed': cfg.random_seed,
    }


#: exit code when a disk is full (EX_IOERR)
EXIT_DISK_FULL = 74
_DISK_FULL = ('[Errno 28]', 'No space left on device', '[Errno 122]', 'Disk quota exceeded')


def disk_full_message(where) -> str:
    return (f'no space left on the device (or disk quota exceeded) while writing {where}. '
            'Free some space (or choose other folders with -w and output_dir), then run the '
            'same command again: the work folder resumes, the outputs already written are '
            'complete and are kept.')


def _crash_kind(cfg, run) -> tuple[int, str]:
    """Exit code and message of the crash files of one run (65 for bad data, 74 for a full
    disk, else 70)."""
    from cerebseg.errors import BadDataError

    crash_dir, log_dir = crash_staging_dir(cfg, run), run_log_dir(cfg, run)
    marker = BadDataError.__name__ + ':'
    for crash in sorted(crash_dir.glob('crash-*.txt')):
        text = crash.read_text(errors='replace')
        for line in text.splitlines():
            if marker in line:
                return 65, line.split(marker, 1)[1].strip()
        if any(sign in text for sign in _DISK_FULL):
            node = next((line.split(':', 1)[1].strip() for line in text.splitlines()
                         if line.startswith('Node:')), 'a step')
            return EXIT_DISK_FULL, disk_full_message(f'the outputs of {node}')
    if not any(crash_dir.glob('crash-*.txt')) and (_nearly_full(crash_dir)
                                                   or _nearly_full(log_dir)):
        return EXIT_DISK_FULL, disk_full_message(f'{log_dir} (not even the crash report '
                                                 'could be written)')
    where = log_dir if any(log_dir.glob('crash-*.txt')) else crash_dir
    return 70, f'a processing step failed; see the crash files in {where}'


def _nearest_existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _nearly_full(path: Path, room: int = 2 ** 20) -> bool:
    """Whether the file system of ``path`` (or of its nearest existing folder) has less than
    ``room`` bytes free."""
    try:
        stat = os.statvfs(_nearest_existing(Path(path)))
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < room


def template_paths(assets) -> dict:
    """Absolute paths of the MNI template ``head``, ``brain``, ``mask``, and ``icv_ml``."""
    tpl = assets.manifest['templates']
    return {'head': str(assets.path(tpl['head'])), 'brain': str(assets.path(tpl['brain'])),
            'mask': str(assets.path(tpl['mask'])), 'icv_ml': tpl['brain_mask_volume_ml']}


def workflow_name(run) -> str:
    """Nipype name of one T1w's workflow; ``cerebseg-train`` uses it too, so that the two
    share the nodes of a work folder."""
    return f'cerebseg_{run.label.replace("-", "_")}_wf'


def select_cnn(run, cfg) -> dict | None:
    """The network weights of one run (None with --models none); CheckpointError if missing."""
    from cerebseg.models.cascade import select_weights

    if cfg.models == 'none' or cfg.skip_cerebellum:
        return None
    return select_weights(cfg.cnn_weights or None, t2w=bool(run.t2w),
                          prior=not cfg.no_atlas_prior, models=cfg.models,
                          protocol=cfg.atlas_library)


#: the top-level Nipype workflow that holds every T1w run of a command; each run's nodes live
#: in WORK_DIR/cerebseg_wf/cerebseg_sub-X_wf/ (cerebseg-train reuses them there)
ROOT_WORKFLOW = 'cerebseg_wf'


def participant_work_dir(work_dir) -> Path:
    """Where the nodes of the runs lie: the base folder of a lone run's workflow that puts
    its nodes where the command's top-level workflow puts them."""
    return Path(work_dir) / ROOT_WORKFLOW


def build_participant_wf(run, cfg, assets, library: dict, device=None,
                         brainstem: dict | None = None):
    """The workflow of one T1w, its crash files sent to the run's log folder."""
    from cerebseg.models.regnet import DEFAULT_WEIGHTS
    from cerebseg.utils.images import atomic_write_text
    from cerebseg.workflows.base import init_single_subject_wf

    output_dir = Path(cfg.output_dir)
    log_dir = run_log_dir(cfg, run)
    log_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(log_dir / 'cerebseg.toml', cfg.to_toml())
    cnn = select_cnn(run, cfg)
    wf = init_single_subject_wf(
        t1w=run.t1w, t2w=run.t2w, output_dir=str(output_dir), templates=template_paths(assets),
        grid=assets.manifest['grid'], library=library, cnn=cnn,
        dseg_meta=_dseg_meta(run, library, Path(cfg.bids_dir), cfg, cnn),
        omp_nthreads=cfg.omp_nthreads, seed=cfg.random_seed, registration=cfg.registration,
        device=str(device or 'cpu'), use_gpu=device is not None and device.type != 'cpu',
        regnet=str(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.is_file() else '',
        brainstem=brainstem, cerebellum=not cfg.skip_cerebellum,
        brainstem_meta=_brainstem_meta(run, brainstem, Path(cfg.bids_dir), cfg)
        if brainstem else None,
        name=workflow_name(run))
    send_crashes_to(wf, crash_staging_dir(cfg, run))
    what = ('cerebellum: ' + (f'DeepCeres {cfg.models}, inputs {cnn["variant"]}' if cnn
                              else 'multi-atlas')) if not cfg.skip_cerebellum else ''
    what = '; '.join(w for w in (what, f'brainstem: {brainstem["method"]}' if brainstem else '')
                     if w)
    LOGGER.info('%s: %s; %s', run.label,
                'T1w+T2w' if run.t2w and not cfg.skip_cerebellum else 'T1w', what)
    return wf


def send_crashes_to(wf, log_dir) -> None:
    """Crash files of the nodes of ``wf`` go to ``log_dir`` (each run's own log folder, though
    all runs share one graph)."""
    for node in wf._get_all_nodes():
        node.config = {'execution': {'crashdump_dir': str(log_dir)}}


def run_log_dir(cfg, run) -> Path:
    return Path(cfg.output_dir) / f'sub-{run.subject}' / 'log' / cfg.run_uuid


def crash_staging_dir(cfg, run) -> Path:
    """Where Nipype writes the crash files of a run: the work folder. Nipype writes them in
    place, so on a full output disk a truncated file would carry a final name;
    :func:`publish_crashes` copies the complete ones into the run's log folder."""
    return Path(cfg.work_dir) / 'crash' / cfg.run_uuid / f'sub-{run.subject}'


def publish_crashes(cfg, run) -> list[Path]:
    """Copy the run's crash files (atomically) into its log folder; returns where each one
    can be read: in the log folder, or in the work folder when it could not be copied (a full
    output disk)."""
    from cerebseg.utils.images import atomic_copy

    log_dir, where = run_log_dir(cfg, run), []
    for crash in sorted(crash_staging_dir(cfg, run).glob('crash-*.txt')):
        final = log_dir / crash.name
        if not final.is_file():
            try:
                log_dir.mkdir(parents=True, exist_ok=True)
                atomic_copy(str(crash), str(final))
            except OSError as err:
                LOGGER.warning('Could not copy the crash file %s into %s (%s); it stays in '
                               'the work folder', crash, log_dir, err)
                where.append(crash)
                continue
        where.append(final)
    return where


def make_progress(workflows: dict, on_finished=None, stream=None, failed=()):
    """A :class:`~cerebseg.bids_app.progress.Progress` of the T1w workflows (label ->
    workflow) as :func:`run_workflows` nests them; ``failed``: labels of runs that failed
    before (counted as failed in its lines)."""
    from cerebseg.bids_app.progress import Progress

    return Progress({label: f'{ROOT_WORKFLOW}.{wf.name}' for label, wf in workflows.items()},
                    {label: count_run_nodes(wf) for label, wf in workflows.items()},
                    on_finished=on_finished, stream=stream, failed=failed)


def count_run_nodes(wf) -> int:
    """The nodes of ``wf`` that Nipype runs: it drops identity nodes that are not joins."""
    from nipype.interfaces.utility import IdentityInterface

    return sum(1 for node in wf._get_all_nodes()
               if not (isinstance(node.interface, IdentityInterface)
                       and not hasattr(node, 'joinsource')))


def run_workflows(cfg, workflows: dict, progress=None):
    """Run the T1w workflows (label -> workflow) as one Nipype graph, so that the plugin fills
    the machine with the nodes of all of them; a failing run stops only its own nodes
    (unless --stop-on-first-crash). Returns the progress (who finished, who failed).
    """
    from nipype import config as ncfg
    from nipype import logging as nlogging
    from nipype.pipeline import engine as pe

    progress = progress or make_progress(workflows)
    top = pe.Workflow(name=ROOT_WORKFLOW, base_dir=str(cfg.work_dir))
    top.add_nodes(list(workflows.values()))
    nipype_level = 'INFO' if cfg.verbose > 1 else 'WARNING'
    ncfg.update_config({'logging': {'workflow_level': nipype_level,
                                    'interface_level': nipype_level,
                                    'utils_level': nipype_level}})
    nlogging.update_logging(ncfg)
    top.config['execution'].update({'crashfile_format': 'txt',
                                    'stop_on_first_crash': bool(cfg.stop_on_first_crash),
                                    'remove_unnecessary_outputs': False})
    plugin, plugin_args = plugin_settings(cfg, progress)
    if plugin in ('SLURM', 'SLURMGraph'):
        from cerebseg.bids_app.slurm import (WaitingSLURMGraphPlugin, ensure_logname, job_tag,
                                             set_node_requests)

        ensure_logname()
        set_node_requests(workflows.values(), f'--comment={job_tag(cfg.run_uuid)} '
                          + plugin_args.get('sbatch_args', ''))
        if plugin == 'SLURMGraph':
            plugin = WaitingSLURMGraphPlugin(plugin_args, tag=job_tag(cfg.run_uuid))
    try:
        top.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as err:  # nipype raises once at the end when any node failed
        LOGGER.debug('Workflow error: %s', err)
    finally:
        progress.close()
    return progress


def plugin_settings(cfg, progress=None) -> tuple[str, dict]:
    """The Nipype plugin and its arguments: ``--plugin`` (default MultiProc with several
    processes, else Linear) and ``--plugin-args`` over cerebseg's own (processes, memory, the
    progress callback where the plugin takes one)."""
    import json

    plugin = getattr(cfg, 'plugin', '') or ('MultiProc' if cfg.nprocs > 1 else 'Linear')
    args = {}
    if plugin == 'MultiProc':
        # workers are new interpreters, not forks: a fork of a process whose torch has run
        # multi-threaded (cerebseg called from Python, the test suite) hangs at the child's
        # first parallel torch operation (GNU OpenMP is not fork-safe)
        args = {'n_procs': cfg.nprocs, 'raise_insufficient': False, 'mp_context': 'spawn'}
        if cfg.mem_gb:
            args['memory_gb'] = cfg.mem_gb
    if progress is not None:   # (cerebseg's SLURMGraph plugin calls it as its jobs end)
        args['status_callback'] = progress
    args.update(json.loads(getattr(cfg, 'plugin_args', '') or '{}'))
    return plugin, args


def run_participant(run, cfg, assets, library: dict, device=None,
                    brainstem: dict | None = None) -> tuple[int, str]:
    """Build and run the workflow of one T1w alone; returns (exit code, message)."""
    wf = build_participant_wf(run, cfg, assets, library, device, brainstem)
    progress = run_workflows(cfg, {run.label: wf})
    if progress.runs[run.label].state == 'done':
        return 0, 'done'
    publish_crashes(cfg, run)
    return _crash_kind(cfg, run)


def check_writable(path, what: str, option: str) -> None:
    """Fail before any work (UsageError: exit 2) when ``path`` cannot be written: a file is
    written and removed in it or, when it does not exist yet, in the folder that will hold it
    (nothing is created; read-only mounts are caught even for root)."""
    import errno
    import tempfile

    from cerebseg.errors import UsageError

    path = Path(path).absolute()
    probe = _nearest_existing(path)
    try:
        if not probe.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe))
        with tempfile.NamedTemporaryFile(dir=probe, prefix='.cerebseg-write-test-'):
            pass
    except OSError as err:
        where = '' if probe == path else f' ({probe} is in the way)' if not probe.is_dir() \
            else f' (its folder {probe})'
        raise UsageError(f'The {what} {path} is not writable{where}: {err.strerror}; fix its '
                         f'permissions or give another one ({option}).') from err


def _prevalidate(run) -> None:
    from cerebseg.utils.images import load_checked

    load_checked(run.t1w, 'T1w')
    if run.t2w:
        load_checked(run.t2w, 'T2w')


def _finalize(cfg, library: dict | None, brainstem: dict | None = None) -> None:
    from cerebseg.bids_app.bids import (write_bidsignore, write_derivative_description,
                                        write_derivatives_readme, write_descriptions,
                                        write_lut)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_derivative_description(cfg.bids_dir, out)
    write_bidsignore(out)
    write_derivatives_readme(cfg.bids_dir, out)
    write_descriptions(out)
    if library:
        write_lut(library['lut'], out, 'cerebellum')
    if brainstem:
        write_lut(brainstem['lut'], out, 'brainstem')


def _report(cfg, run, assets, *, started, code: int, message: str, device: str) -> None:
    """The run's status file and the participant's report (a failure here is logged, never
    turned into a failed run: the derivatives are already written)."""
    from cerebseg.bids_app.reports import (atlas_asymmetry, participant_flags, run_results,
                                           write_participant_report, write_status)

    out = Path(cfg.output_dir)
    log_dir = out / f'sub-{run.subject}' / 'log' / cfg.run_uuid
    try:
        results = run_results(out, run.label)
        reference = assets.reference()
        baselines = {}
        if 'brainstem' in results:   # its label set is asymmetric (SNr -0.45): compare to it
            section = assets.brainstem()
            baselines['brainstem'] = atlas_asymmetry(str(assets.path(section['dseg'])),
                                                     str(assets.path(section['lut'])))
        flags = participant_flags(results, reference, baselines)
        write_status(out, run, log_dir, started=started, code=code, message=message,
                     device=device, run_uuid=cfg.run_uuid, qc_flags=flags)
        report = write_participant_report(out, run.subject, reference)
        for flag in flags:
            LOGGER.warning('%s: QC flag %s', run.label, flag['message'])
        LOGGER.log(IMPORTANT, '%s: report %s', run.label, report)
    except Exception:  # noqa: BLE001 - a report must never fail the run
        LOGGER.exception('Could not write the report of %s', run.label)


def main(argv: list[str] | None = None) -> int:
    from cerebseg.bids_app.parser import parse_args

    opts = parse_args(argv)
    _set_environment(opts.omp_nthreads)
    _setup_logging(opts.verbose)

    from cerebseg.assets.locate import load_assets
    from cerebseg.bids_app.bids import collect_inputs, load_filters
    from cerebseg.bids_app.config import RunConfig
    from cerebseg.errors import CerebsegError, MissingAssetError, UsageError
    from cerebseg.models.inference import resolve_device

    cfg = RunConfig.from_namespace(opts)
    try:
        check_writable(cfg.output_dir, 'output folder', 'output_dir')
        if cfg.analysis_level == 'participant':
            check_writable(cfg.work_dir, 'work folder', '-w/--work-dir')
        if cfg.analysis_level == 'group':
            from cerebseg.bids_app.group import write_group_outputs

            for path in write_group_outputs(cfg.output_dir, cfg.bids_dir, cfg.group_by or None):
                LOGGER.log(IMPORTANT, 'Group output written: %s', path)
            return 0
        try:
            device = resolve_device(cfg.device)
        except ValueError as err:
            raise UsageError(str(err)) from err
        LOGGER.info('Torch device: %s', device)
        if cfg.skip_brainstem and cfg.skip_cerebellum:
            raise UsageError('--skip-brainstem and --skip-cerebellum leave nothing to do.')
        assets = load_assets(cfg.assets_dir or None)
        library = _library_paths(assets, cfg.atlas_library)
        brainstem = _brainstem_paths(assets, cfg)
        if cfg.skip_cerebellum and brainstem is None:
            raise MissingAssetError(f'--skip-cerebellum: the assets in {assets.root} have no '
                                    'brainstem label set; rebuild them (cerebseg-assets build).')
        if cfg.models == 'none' and cfg.no_atlas_prior:
            raise UsageError('--no-atlas-prior needs the networks; it cannot be combined with '
                             '--models none (the multi-atlas labels are the prior).')
        runs = collect_inputs(cfg.bids_dir, cfg.participant_label, cfg.session_label,
                              load_filters(cfg.bids_filter_file or None), cfg.t1_only,
                              validate=not cfg.skip_bids_validation)
        for run in runs:  # missing or mismatched weights stop everything (exit 126)
            select_cnn(run, cfg)
    except CerebsegError as err:
        LOGGER.error('%s', err)
        return err.exit_code
    LOGGER.log(IMPORTANT, 'cerebseg %s: %d T1w run(s) to process; run %s', cfg.version,
               len(runs), cfg.run_uuid)
    try:
        _finalize(cfg, None if cfg.skip_cerebellum else library, brainstem)
    except OSError as err:
        if err.errno in (28, 122):   # ENOSPC, EDQUOT
            LOGGER.error('%s', disk_full_message(cfg.output_dir))
            return EXIT_DISK_FULL
        raise
    results = run_all(cfg, runs, assets, library, device, brainstem)
    _summary(cfg, runs, results, sys.argv[1:] if argv is None else list(argv))
    codes = [code for code, _ in results.values() if code]
    if not codes:
        return 0
    return 70 if 70 in codes else max(codes)


def run_all(cfg, runs, assets, library, device, brainstem) -> dict:
    """Every T1w run in one graph; each run's report written as soon as it finishes (failed
    ones at the end). Returns label -> (exit code, message)."""
    from cerebseg.errors import CerebsegError

    by_label = {run.label: run for run in runs}
    results, workflows = {}, {}
    now = datetime.now(timezone.utc)
    for run in runs:   # inputs that cannot be read fail here, before any work
        try:
            _prevalidate(run)
            workflows[run.label] = build_participant_wf(run, cfg, assets, library, device,
                                                        brainstem)
        except CerebsegError as err:
            results[run.label] = (err.exit_code, str(err))
        except Exception as err:  # a bug: say so, keep going with the other participants
            LOGGER.exception('Unexpected error while preparing %s', run.label)
            results[run.label] = (70, f'internal error: {err!r} (please report it)')
    for label, (code, msg) in results.items():
        LOGGER.error('%s failed (exit %d): %s', label, code, msg)
        _report(cfg, by_label[label], assets, started=now, code=code, message=msg,
                device=str(device))
    if results and cfg.stop_on_first_crash:
        workflows = {}

    def finished(label):
        results[label] = (0, 'done')
        _report(cfg, by_label[label], assets, started=progress.runs[label].started_at or now,
                code=0, message='done', device=str(device))

    if workflows:
        progress = make_progress(workflows, on_finished=finished,
                                 failed=[label for label, (code, _) in results.items() if code])
        run_workflows(cfg, workflows, progress)
        for label in workflows:
            if label in results:
                continue
            state = progress.runs[label]
            crashed = list(crash_staging_dir(cfg, by_label[label]).glob('crash-*.txt'))
            if not state.failed and not crashed and state.started is not None \
                    and not cfg.stop_on_first_crash:
                LOGGER.debug('%s: %d of %d nodes seen; finished', label, state.done, state.total)
                finished(label)   # every node ran (the count missed some): not a failure
                continue
            publish_crashes(cfg, by_label[label])
            if state.failed:
                code, msg = _crash_kind(cfg, by_label[label])
            else:
                code, msg = 70, 'not finished: the run was stopped (--stop-on-first-crash)'
            results[label] = (code, msg)
            LOGGER.error('%s failed (exit %d): %s', label, code, msg)
            _report(cfg, by_label[label], assets, started=state.started_at or now, code=code,
                    message=msg, device=str(device))
    return results


def rerun_command(argv: list[str], subjects: list[str]) -> str:
    """The command line that runs ``subjects`` again with the same options."""
    import shlex

    out, skip = [], False
    for token in argv:
        if token in ('--participant-label', '--participant_label'):
            skip = True
            continue
        if skip and not token.startswith('-'):
            continue
        skip = False
        out.append(token)
    return shlex.join(['cerebseg', *out, '--participant-label', *subjects])


def _summary(cfg, runs, results: dict, argv: list[str]) -> None:
    done = [r for r in runs if results.get(r.label, (70,))[0] == 0]
    failed = [r for r in runs if results.get(r.label, (70,))[0] != 0]
    LOGGER.log(IMPORTANT, 'Summary: %d of %d T1w run(s) finished%s', len(done), len(runs),
               f', {len(failed)} failed' if failed else '')
    for run in failed:
        code, msg = results.get(run.label, (70, 'not run'))
        log_dir = run_log_dir(cfg, run)
        crashes = publish_crashes(cfg, run)
        LOGGER.error('  %s (exit %d): %s\n    log: %s%s', run.label, code, msg, log_dir,
                     ''.join(f'\n    crash file: {c}' for c in crashes))
    if failed:
        subjects = sorted({run.subject for run in failed})
        LOGGER.log(IMPORTANT, 'To re-run only the failures (the work folder resumes the rest): '
                   '%s', rerun_command(argv, subjects))


if __name__ == '__main__':
    raise SystemExit(main())
