"""Running the graph on SLURM through Nipype's plugins (``--plugin SLURM`` or ``SLURMGraph``).

Both plugins submit each node as one ``sbatch`` job. cerebseg adds to every job what its node
declares (``--cpus-per-task`` from ``n_procs``, ``--mem`` from ``mem_gb``), before the user's
``sbatch_args`` so that theirs win, and tags the jobs with the run's id
(``--comment=cerebseg:<run uuid>``).

``SLURM`` keeps the command running: it submits nodes as their inputs become ready and follows
them with ``squeue``, so the progress, the reports and the summary work as with MultiProc.
``SLURMGraph`` submits the whole graph at once (dependencies ``afterok``) and returns; cerebseg
then waits for the tagged jobs itself (:class:`WaitingSLURMGraphPlugin`), reads each node's
result file as it appears, cancels the jobs whose dependencies failed (they would wait for
ever on clusters that do not set ``kill_invalid_depend``), and reports as the other plugins.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from pathlib import Path

from nipype.pipeline.plugins.slurmgraph import SLURMGraphPlugin

LOGGER = logging.getLogger('cerebseg.cli')

SLURM_PLUGINS = ('SLURM', 'SLURMGraph')


def job_tag(run_uuid: str) -> str:
    return f'cerebseg:{run_uuid}'


def node_sbatch_args(node) -> str:
    """What one node asks of SLURM: its threads and its memory (at least 1 GB)."""
    cpus = max(int(getattr(node, 'n_procs', 1) or 1), 1)
    mem_mb = max(int(math.ceil(float(getattr(node, 'mem_gb', 1) or 1) * 1024)), 1024)
    return f'--cpus-per-task={cpus} --mem={mem_mb}M'


def set_node_requests(workflows, user_sbatch_args: str = '') -> None:
    """Every node of ``workflows`` submits with its own requests followed by the user's
    ``sbatch_args`` (sbatch takes the last of a repeated option: the user's win)."""
    for wf in workflows:
        for node in wf._get_all_nodes():
            args = ' '.join(a for a in (node_sbatch_args(node), user_sbatch_args) if a)
            node.plugin_args = {'sbatch_args': ' ' + args, 'overwrite': True}


def ensure_logname() -> None:
    """Nipype's SLURM plugin names jobs after ``$LOGNAME``, unset in many containers and
    batch environments."""
    if not os.environ.get('LOGNAME'):
        import getpass

        try:
            os.environ['LOGNAME'] = getpass.getuser()
        except (KeyError, OSError):
            os.environ['LOGNAME'] = f'uid{os.getuid()}'


def queued_jobs(tag: str) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of the queued jobs carrying ``tag`` as their comment."""
    out = subprocess.run(['squeue', '-h', '-o', '%i|%T|%r|%k'], capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(f'squeue failed: {out.stderr.strip()}')
    jobs = []
    for line in out.stdout.splitlines():
        parts = line.split('|', 3)
        if len(parts) == 4 and parts[3].strip() == tag:
            jobs.append((parts[0].strip(), parts[1].strip(), parts[2].strip()))
    return jobs


def _node_result(node):
    """(finished, failed) from the result file Nipype writes in the node's folder (it writes
    one on failure too, with the traceback)."""
    from nipype.utils.filemanip import loadpkl

    path = Path(node.output_dir()) / f'result_{node.name}.pklz'
    if not path.exists():
        return False, False, None
    try:
        result = loadpkl(path)
    except Exception:  # noqa: BLE001 - being written: look again at the next poll
        return False, False, None
    failed = bool(getattr(getattr(result, 'runtime', None), 'traceback', None))
    return True, failed, path.stat().st_mtime


class WaitingSLURMGraphPlugin(SLURMGraphPlugin):
    """Nipype's SLURMGraph plugin, then a wait for its jobs (see the module docstring).

    ``status_callback`` receives each node's ``'start'`` and ``'end'`` (or ``'exception'``)
    as its job's result appears; ``tag`` marks the jobs; ``poll`` is the seconds between
    looks at the queue.
    """

    def __init__(self, plugin_args=None, tag: str = 'cerebseg', poll: float = 5.0):
        plugin_args = dict(plugin_args or {})
        plugin_args.setdefault('dont_resubmit_completed_jobs', True)
        self._callback = plugin_args.pop('status_callback', None)
        self.tag = tag
        self.poll = float(plugin_args.pop('poll_sleep_duration', poll))
        super().__init__(plugin_args=plugin_args)
        self._sbatch_args = f'{self._sbatch_args} --comment={tag}'.strip()
        self.nodes = []

    def _submit_graph(self, pyfiles, dependencies, nodes):
        self.nodes = list(nodes)
        self.outputs = [os.path.join(os.path.dirname(path), 'batchscript_'
                                     + os.path.splitext(os.path.basename(path))[0] + '.sh.e')
                        for path in pyfiles]
        self.submitted = time.time()
        super()._submit_graph(pyfiles, dependencies, nodes)
        LOGGER.info('%d node jobs submitted to SLURM (comment %s); waiting for them',
                    len(nodes), self.tag)
        self.wait()

    def _event(self, node, status):
        if self._callback is not None:
            self._callback(node, status)

    def wait(self) -> None:
        pending = dict(enumerate(self.nodes))
        while True:
            for idx, node in list(pending.items()):
                finished, failed, mtime = _node_result(node)
                if finished and mtime >= self.submitted - 1:   # written by this submission
                    self._event(node, 'start')
                    self._event(node, 'exception' if failed else 'end')
                    del pending[idx]
            jobs = queued_jobs(self.tag)
            stuck = [job for job, state, reason in jobs
                     if state == 'PENDING' and 'DependencyNeverSatisfied' in reason]
            if stuck:   # their dependencies failed: they would never start
                subprocess.run(['scancel', *stuck], capture_output=True, check=False)
                LOGGER.debug('cancelled %d jobs whose dependencies failed', len(stuck))
            if not jobs:
                break
            time.sleep(self.poll)
        for idx, node in pending.items():   # not re-run (done before), or lost
            finished, failed, _ = _node_result(node)
            self._event(node, 'start')
            if finished and not failed:
                self._event(node, 'end')
                continue
            if not finished:
                LOGGER.error('%s: its SLURM job ended without a result (cancelled, out of '
                             'memory or time?); see %s', node.fullname, self.outputs[idx])
            self._event(node, 'exception')
