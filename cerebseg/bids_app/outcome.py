"""How the runs of a command end: exit codes, messages, crash files and the summary.

The exit code of a run whose nodes failed comes from the failure records that cerebseg's
interfaces leave in their node folders (:mod:`cerebseg.interfaces.base`), found through the
nodes that the scheduler reported as failed in this command (the
:class:`~cerebseg.bids_app.progress.Progress` callback keeps each failed node's folder;
MultiProc, Linear, SLURM and cerebseg's SLURMGraph plugin all report them): 65 for bad input
data (any :class:`~cerebseg.errors.CerebsegError` gives its ``exit_code``), 74 for a full disk
or an exceeded quota, else 70. Without a record (a failure outside an interface, or a record
that could not be written) a nearly full disk still gives 74; anything else is a crash (70)
that points at the crash files. The text of the crash files is never searched: they are for
the user, who finds them in the run's log folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from cerebseg.bids_app.logs import IMPORTANT, LOGGER
from cerebseg.errors import EXIT_CRASH, EXIT_DISK_FULL

__all__ = ['EXIT_DISK_FULL', 'command_exit_code', 'crash_staging_dir', 'disk_full_message',
           'nearest_existing', 'nearly_full', 'publish_crashes', 'rerun_command', 'run_log_dir',
           'run_outcome', 'send_crashes_to', 'summary', 'unfinished_outcome']


def disk_full_message(where) -> str:
    """What to do when a disk filled up while writing ``where``."""
    return (f'no space left on the device (or disk quota exceeded) while writing {where}. '
            'Free some space (or choose other folders with -w and output_dir), then run the '
            'same command again: the work folder resumes, the outputs already written are '
            'complete and are kept.')


def run_log_dir(cfg, run) -> Path:
    """The run's log folder: its config, status file and crash files."""
    return Path(cfg.output_dir) / f'sub-{run.subject}' / 'log' / cfg.run_uuid


def crash_staging_dir(cfg, run) -> Path:
    """Where Nipype writes the crash files of a run: the work folder. Nipype writes them in
    place, so on a full output disk a truncated file would carry a final name;
    :func:`publish_crashes` copies the complete ones into the run's log folder."""
    return Path(cfg.work_dir) / 'crash' / cfg.run_uuid / f'sub-{run.subject}'


def send_crashes_to(wf, log_dir) -> None:
    """Crash files of the nodes of ``wf`` go to ``log_dir`` (each run's own log folder, though
    all runs share one graph)."""
    for node in wf._get_all_nodes():
        node.config = {'execution': {'crashdump_dir': str(log_dir)}}


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


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def nearly_full(path: Path, room: int = 2 ** 20) -> bool:
    """Whether the file system of ``path`` (or of its nearest existing folder) has less than
    ``room`` bytes free."""
    try:
        stat = os.statvfs(nearest_existing(Path(path)))
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < room


def run_outcome(cfg, run, state) -> tuple[int, str]:
    """Exit code and message of a run whose nodes failed in this command (``state``: its
    :class:`~cerebseg.bids_app.progress.RunState`, with the failed nodes' folders)."""
    from cerebseg.interfaces.base import read_failure_records

    crash_dir, log_dir = crash_staging_dir(cfg, run), run_log_dir(cfg, run)
    records = [(name, record) for name, folder in state.failures if folder
               for record in read_failure_records(folder)]
    for _, record in records:   # bad input data (or another error of cerebseg's) first
        if record['exit_code'] not in (EXIT_CRASH, EXIT_DISK_FULL):
            return record['exit_code'], record['message']
    for name, record in records:
        if record['exit_code'] == EXIT_DISK_FULL:
            return EXIT_DISK_FULL, disk_full_message(f'the outputs of {name}')
    if not records:   # not an interface's failure, or its record could not be written
        if not any(crash_dir.glob('crash-*.txt')) and (nearly_full(crash_dir)
                                                       or nearly_full(log_dir)):
            return EXIT_DISK_FULL, disk_full_message(f'{log_dir} (not even the crash report '
                                                     'could be written)')
        full = next((name for name, folder in state.failures
                     if folder and nearly_full(folder)), None)
        if full is not None:
            return EXIT_DISK_FULL, disk_full_message(f'the outputs of {full}')
    where = log_dir if any(log_dir.glob('crash-*.txt')) else crash_dir
    return EXIT_CRASH, f'a processing step failed; see the crash files in {where}'


def unfinished_outcome(cfg, error: str | None = None) -> tuple[int, str]:
    """Exit code and message of a run that neither failed nor finished; ``error``: what the
    graph raised, if anything."""
    if cfg.stop_on_first_crash:
        return EXIT_CRASH, 'not finished: the run was stopped (--stop-on-first-crash)'
    return EXIT_CRASH, ('not finished: the workflow stopped before its last node'
                        + (f' ({error})' if error else ' (no error was reported; see the log)'))


def command_exit_code(results: dict) -> int:
    """The exit code of the command from those of its runs (label -> (code, message)): 0 when
    all finished, 70 when any crashed, else the highest."""
    codes = [code for code, _ in results.values() if code]
    if not codes:
        return 0
    return EXIT_CRASH if EXIT_CRASH in codes else max(codes)


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


def summary(cfg, runs, results: dict, argv: list[str]) -> None:
    """The closing lines of the command: how many runs finished; each failure with its log
    folder and crash files; the command that re-runs the failures."""
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
