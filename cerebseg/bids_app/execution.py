"""The participant level: check, build and run the T1w workflows, then report each run.

:func:`prepare` checks everything a command needs before any work (exit 2, 65, 126 on a
problem); :func:`run_all` builds the workflow of each T1w and runs them all in one Nipype graph
(:func:`run_workflows`), writing each run's status file and report as soon as it finishes.
How each run ended is decided in :mod:`cerebseg.bids_app.outcome`.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from cerebseg.bids_app.logs import IMPORTANT, LOGGER
from cerebseg.assets import protocol_setting, registration_control_mm
from cerebseg.bids_app.metadata import (brainstem_meta, dseg_meta, fusion_settings,
                                        lobule_branches, outline_mode, select_cnn)
from cerebseg.bids_app.outcome import (crash_staging_dir, nearest_existing, publish_crashes,
                                       run_log_dir, run_outcome, send_crashes_to,
                                       unfinished_outcome)
from cerebseg.workflows.workdir import ROOT_WORKFLOW, workflow_name


class Plan(NamedTuple):
    """What a participant-level command runs: the T1w runs and what they use."""

    runs: list
    assets: object
    library: dict
    device: object
    brainstem: dict | None


def prepare(cfg) -> Plan:
    """Check the device, assets, options and inputs of a participant-level command before any
    work; a :class:`~cerebseg.errors.CerebsegError` (its exit code) when one is wrong."""
    from cerebseg.assets.locate import load_assets
    from cerebseg.bids_app.bids import collect_inputs, load_filters
    from cerebseg.bids_app.metadata import brainstem_paths
    from cerebseg.errors import MissingAssetError, UsageError
    from cerebseg.models.inference import resolve_device

    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    LOGGER.info('Torch device: %s', device)
    if cfg.skip_brainstem and cfg.skip_cerebellum:
        raise UsageError('--skip-brainstem and --skip-cerebellum leave nothing to do.')
    assets = load_assets(cfg.assets_dir or None)
    library = assets.library_paths(cfg.atlas_library)
    brainstem = brainstem_paths(assets, cfg)
    if cfg.skip_cerebellum and brainstem is None:
        raise MissingAssetError(f'--skip-cerebellum: the assets in {assets.root} have no '
                                'brainstem label set; rebuild them (cerebseg-assets build).')
    if not cfg.skip_cerebellum:
        check_output_protocol(cfg.output_dir, library,
                              {name: assets.path(lib['lut'])
                               for name, lib in assets.manifest['libraries'].items()})
        try:
            branches = lobule_branches(cfg, library)
        except ValueError as err:
            raise UsageError(str(err)) from err
        if branches and cfg.lobule_votes == 'auto' and not branches.get('votes') \
                and protocol_setting(library, 'lobule_votes', None):
            LOGGER.warning('The %r library in %s was built without its lobule votes (an '
                           'older cerebseg): the lobule borders follow the branches without '
                           'them, less accurately. Rebuild the assets (cerebseg-assets build '
                           '--library %s).', library['name'], assets.root, library['name'])
    if cfg.models == 'none' and cfg.no_atlas_prior:
        raise UsageError('--no-atlas-prior needs the networks; it cannot be combined with '
                         '--models none (the multi-atlas labels are the prior).')
    runs = collect_inputs(cfg.bids_dir, cfg.participant_label, cfg.session_label,
                          load_filters(cfg.bids_filter_file or None), cfg.t1_only,
                          validate=not cfg.skip_bids_validation)
    for run in runs:  # missing or mismatched weights stop everything (exit 126)
        select_cnn(run, cfg)
    return Plan(runs, assets, library, device, brainstem)


def check_output_protocol(output_dir, library: dict, luts: dict) -> None:
    """Refuse (exit 2) to write the cerebellar labels of ``library`` into an output folder
    whose lookup table (``seg-cerebellum_dseg.tsv``) is another protocol's: the run would
    replace it, and the labels of the earlier runs would be read with the wrong names (e.g.
    SUIT runs of a dataset continued after cobra became the default). ``luts``: each library's
    lookup table, to name the folder's protocol."""
    from cerebseg.assets import LUT_NAME
    from cerebseg.errors import UsageError
    from cerebseg.utils.native import read_lut_tsv

    def labels(path) -> set:
        return {(row['index'], row['name']) for row in read_lut_tsv(path)}

    existing = Path(output_dir) / LUT_NAME
    if not existing.is_file():
        return
    found = labels(existing)      # indices and names: the colours may change between versions
    if found == labels(library['lut']):
        return
    other = next((name for name, lut in luts.items()
                  if name != library['name'] and Path(lut).is_file() and labels(lut) == found),
                 None)
    if other:
        raise UsageError(f'{output_dir} holds cerebellar labels of the {other!r} protocol '
                         f'({existing}); this run would write {library["name"]!r} labels '
                         f'beside them and replace that lookup table. To continue that '
                         f'dataset pass --atlas-library {other}; for {library["name"]!r} '
                         f'labels choose another output folder.')
    raise UsageError(f'{output_dir} holds cerebellar labels whose lookup table ({existing}) '
                     f'names other labels than the {library["name"]!r} library\'s; choose '
                     f'another output folder, or the --atlas-library of the earlier runs.')


def build_participant_wf(run, cfg, assets, library: dict, device=None,
                         brainstem: dict | None = None):
    """The workflow of one T1w, its crash files sent to the run's log folder."""
    from cerebseg.models.checkpoint import DEFAULT_REGNET
    from cerebseg.utils.images import atomic_write_text
    from cerebseg.workflows.base import fusion_kwargs, init_single_subject_wf

    output_dir = Path(cfg.output_dir)
    log_dir = run_log_dir(cfg, run)
    log_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(log_dir / 'cerebseg.toml', cfg.to_toml())
    cnn = select_cnn(run, cfg)
    wf = init_single_subject_wf(
        t1w=run.t1w, t2w=run.t2w, output_dir=str(output_dir), templates=assets.template_paths(),
        grid=assets.manifest['grid'], library=library, cnn=cnn,
        dseg_meta=dseg_meta(run, library, Path(cfg.bids_dir), cfg, cnn),
        omp_nthreads=cfg.omp_nthreads, seed=cfg.random_seed, registration=cfg.registration,
        symmetric_affine=cfg.affine_fit == 'symmetric',
        coarse_affine=cfg.affine_fit == 'coarse',
        **fusion_kwargs(fusion_settings(cfg, library)), outline=outline_mode(cfg, library),
        reg_control_mm=registration_control_mm(library), branches=lobule_branches(cfg, library),
        device=str(device or 'cpu'), use_gpu=device is not None and device.type != 'cpu',
        regnet=str(DEFAULT_REGNET) if DEFAULT_REGNET.is_file() else '',
        brainstem=brainstem, cerebellum=not cfg.skip_cerebellum,
        brainstem_meta=brainstem_meta(run, brainstem, Path(cfg.bids_dir), cfg)
        if brainstem else None,
        name=workflow_name(run.label))
    send_crashes_to(wf, crash_staging_dir(cfg, run))
    what = ('cerebellum: ' + (f'DeepCeres {cfg.models}, inputs {cnn["variant"]}' if cnn
                              else 'multi-atlas')) if not cfg.skip_cerebellum else ''
    what = '; '.join(w for w in (what, f'brainstem: {brainstem["method"]}' if brainstem else '')
                     if w)
    LOGGER.info('%s: %s; %s', run.label,
                'T1w+T2w' if run.t2w and not cfg.skip_cerebellum else 'T1w', what)
    return wf


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
    (unless --stop-on-first-crash). Returns the progress (who finished, who failed, and in
    ``progress.error`` the last line of what the graph raised, which is logged as well).
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
    plugin, plugin_args = plugin_settings(cfg, progress)
    top.config['execution'].update(execution_settings(cfg, plugin))
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
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        progress.error = lines[-1] if lines else type(err).__name__   # (a traceback's end)
        if any(state.failures for state in progress.runs.values()):   # (said per node)
            LOGGER.warning('The workflow ended with failed nodes: %s', progress.error)
        else:   # the graph did not start, or stopped without a failed node
            LOGGER.error('The workflow stopped: %s: %s', type(err).__name__, err)
    finally:
        progress.close()
    return progress


#: seconds between two looks of the MultiProc scheduler at its workers (Nipype's default: 2).
#: A participant is a chain of about 20 nodes, most of them a few seconds long, and each waited
#: up to a whole poll before the next started. Batch-queue plugins keep Nipype's default (each
#: look asks the queue about every job).
POLL_SECONDS = 0.2


def execution_settings(cfg, plugin: str) -> dict:
    """Nipype's ``execution`` settings of a run with ``plugin``."""
    settings = {'crashfile_format': 'txt', 'stop_on_first_crash': bool(cfg.stop_on_first_crash),
                'remove_unnecessary_outputs': False}
    if plugin == 'MultiProc':
        settings['poll_sleep_duration'] = POLL_SECONDS
    return settings


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
    state = progress.runs[run.label]
    if state.failed:
        return run_outcome(cfg, run, state)
    return unfinished_outcome(cfg, progress.error)


def check_writable(path, what: str, option: str) -> None:
    """Fail before any work (UsageError: exit 2) when ``path`` cannot be written: a file is
    written and removed in it or, when it does not exist yet, in the folder that will hold it
    (nothing is created; read-only mounts are caught even for root)."""
    import errno
    import tempfile

    from cerebseg.errors import UsageError

    path = Path(path).absolute()
    probe = nearest_existing(path)
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


def prevalidate(run) -> None:
    """Read the run's images before any work (BadDataError: exit 65)."""
    from cerebseg.utils.images import load_checked

    load_checked(run.t1w, 'T1w')
    if run.t2w:
        load_checked(run.t2w, 'T2w')


def finalize(cfg, library: dict | None, brainstem: dict | None = None) -> None:
    """The files at the root of the output folder: dataset description, .bidsignore, README,
    the descriptions and lookup tables of the label sets."""
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


def report_run(cfg, run, assets, *, started, code: int, message: str, device: str) -> None:
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


def run_all(cfg, runs, assets, library, device, brainstem) -> dict:
    """Every T1w run in one graph; each run's report written as soon as it finishes (failed
    ones at the end). Returns label -> (exit code, message)."""
    from cerebseg.errors import CerebsegError

    by_label = {run.label: run for run in runs}
    results, workflows = {}, {}
    now = datetime.now(timezone.utc)
    for run in runs:   # inputs that cannot be read fail here, before any work
        try:
            prevalidate(run)
            workflows[run.label] = build_participant_wf(run, cfg, assets, library, device,
                                                        brainstem)
        except CerebsegError as err:
            results[run.label] = (err.exit_code, str(err))
        except Exception as err:  # a bug: say so, keep going with the other participants
            LOGGER.exception('Unexpected error while preparing %s', run.label)
            results[run.label] = (70, f'internal error: {err!r} (please report it)')
    for label, (code, msg) in results.items():
        LOGGER.error('%s failed (exit %d): %s', label, code, msg)
        report_run(cfg, by_label[label], assets, started=now, code=code, message=msg,
                   device=str(device))
    if results and cfg.stop_on_first_crash:
        workflows = {}

    def finished(label):
        results[label] = (0, 'done')
        report_run(cfg, by_label[label], assets,
                   started=progress.runs[label].started_at or now, code=0, message='done',
                   device=str(device))

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
                code, msg = run_outcome(cfg, by_label[label], state)
            else:
                code, msg = unfinished_outcome(cfg, progress.error)
            results[label] = (code, msg)
            LOGGER.error('%s failed (exit %d): %s', label, code, msg)
            report_run(cfg, by_label[label], assets, started=state.started_at or now,
                       code=code, message=msg, device=str(device))
    return results

