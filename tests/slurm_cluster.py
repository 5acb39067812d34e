"""A real single-node SLURM for the tests: MUNGE, ``slurmctld`` and ``slurmd`` from Debian's
packages (``slurmctld slurmd slurm-client munge``), started as root with everything they keep
(key, state, spool, logs, sockets, configuration) in one temporary folder. Client commands
(``sbatch``, ``squeue``, ...) find it through ``SLURM_CONF``, which :meth:`Cluster.start` sets in
``os.environ`` (and :meth:`Cluster.stop` restores), so that Nipype's SLURM plugins and
``scripts/slurm-array.sh`` submit to it as they would on a real cluster.

Also a command, for a person trying ``scripts/slurm-array.sh`` by hand::

    python tests/slurm_cluster.py DIR     # starts it, prints the export line, waits for Ctrl-C
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ('munged', 'slurmctld', 'slurmd')
CLIENTS = ('sbatch', 'squeue', 'sinfo', 'scancel')


def _every_cpu() -> None:
    """(In the child, before exec) allow every CPU of the host."""
    if hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


def unavailable() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    if os.geteuid() != 0:
        return 'the daemons are started as root'
    missing = [name for name in DAEMONS + CLIENTS
               if not shutil.which(name, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin')]
    if missing:
        return f'not installed: {", ".join(missing)} (apt-get install slurmctld slurmd ' \
               'slurm-client munge)'
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin')


class Cluster:
    """One node (this machine: its CPUs and memory), one partition ``debug``."""

    def __init__(self, root: str | Path | None = None):
        # short: a UNIX socket path has at most 107 characters
        self.root = Path(root or tempfile.mkdtemp(prefix='cs-slurm-'))
        self.conf = self.root / 'slurm.conf'
        self.procs: dict[str, subprocess.Popen] = {}
        self._saved_env: dict[str, str | None] = {}

    # -- set-up ------------------------------------------------------------------------------
    def _node_line(self) -> str:
        out = subprocess.run([_which('slurmd'), '-C'], capture_output=True, text=True,
                             check=True).stdout
        line = next(line for line in out.splitlines() if line.startswith('NodeName='))
        # leave the operating system some memory: jobs ask for what the scheduler may give
        fields = dict(item.split('=', 1) for item in line.split())
        fields['RealMemory'] = str(int(fields['RealMemory']) - 1024)
        self.node = fields['NodeName']
        self.cpus = int(fields['CPUs'])
        self.memory_mb = int(fields['RealMemory'])
        return ' '.join(f'{k}={v}' for k, v in fields.items()) + ' State=UNKNOWN'

    def _write_config(self) -> None:
        r = self.root
        for sub in ('state', 'spool', 'log', 'run'):
            (r / sub).mkdir(parents=True, exist_ok=True)
        key = r / 'munge.key'
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = r / 'run' / 'munge.socket'
        node = self._node_line()
        self.conf.write_text('\n'.join([
            'ClusterName=cerebseg-test',
            f'SlurmctldHost={self.node}(127.0.0.1)',
            'SlurmUser=root',
            'SlurmdUser=root',
            f'SlurmctldPort={_free_port()}',
            f'SlurmdPort={_free_port()}',
            'AuthType=auth/munge',
            'CredType=cred/munge',
            f'AuthInfo=socket={self.munge_socket}',
            f'StateSaveLocation={r / "state"}',
            f'SlurmdSpoolDir={r / "spool"}',
            f'SlurmctldPidFile={r / "run" / "slurmctld.pid"}',
            f'SlurmdPidFile={r / "run" / "slurmd.pid"}',
            f'SlurmctldLogFile={r / "log" / "slurmctld.log"}',
            f'SlurmdLogFile={r / "log" / "slurmd.log"}',
            'ProctrackType=proctrack/linuxproc',
            'TaskPlugin=task/none',
            'SelectType=select/cons_tres',
            'SelectTypeParameters=CR_Core_Memory',
            'SchedulerType=sched/backfill',
            'MpiDefault=none',
            'JobAcctGatherType=jobacct_gather/none',
            'AccountingStorageType=accounting_storage/none',
            'ReturnToService=2',
            'SlurmctldTimeout=30',
            'SlurmdTimeout=30',
            'InactiveLimit=0',
            'MinJobAge=300',
            'KillWait=5',
            'Waittime=0',
            node,
            f'PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP',
            '',
        ]))

    # -- life cycle --------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> 'Cluster':
        """Start the three daemons and wait until the node is idle; ``SLURM_CONF`` is set in
        this process's environment (restored by :meth:`stop`)."""
        reason = unavailable()
        if reason:
            raise RuntimeError(f'cannot start SLURM here: {reason}')
        self._write_config()
        r = self.root
        self._saved_env = {'SLURM_CONF': os.environ.get('SLURM_CONF')}
        os.environ['SLURM_CONF'] = str(self.conf)
        logs = r / 'log'
        self.procs['munged'] = subprocess.Popen(
            [_which('munged'), '--foreground', '--force', f'--key-file={r / "munge.key"}',
             f'--socket={self.munge_socket}', f'--pid-file={r / "run" / "munged.pid"}',
             f'--log-file={logs / "munged.log"}', f'--seed-file={r / "run" / "munge.seed"}'],
            stdout=subprocess.DEVNULL, stderr=open(logs / 'munged.err', 'wb'))
        self._wait(lambda: self.munge_socket.exists(), timeout, 'munged')
        self.procs['slurmctld'] = subprocess.Popen(
            [_which('slurmctld'), '-D', '-i', '-f', str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=open(logs / 'slurmctld.err', 'wb'))
        # the node's jobs run on every CPU of the node (task/none: a job inherits slurmd's
        # affinity, which would be the test worker's one CPU under pytest-xdist)
        self.procs['slurmd'] = subprocess.Popen(
            [_which('slurmd'), '-D', '-f', str(self.conf), '-N', self.node],
            stdout=subprocess.DEVNULL, stderr=open(logs / 'slurmd.err', 'wb'),
            preexec_fn=_every_cpu)

        def idle():
            out = subprocess.run(['sinfo', '-h', '-N', '-o', '%T'], capture_output=True,
                                 text=True).stdout.strip()
            return out == 'idle'
        self._wait(idle, timeout, 'the node to be idle')
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f'SLURM did not start ({what}; ended: {dead}):\n'
                                   + self.logs())
            time.sleep(0.3)

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / 'log').glob('*')):
            text = path.read_text(errors='replace')[-3000:]
            parts.append(f'--- {path.name}\n{text}')
        return '\n'.join(parts)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, restore ``SLURM_CONF``."""
        if self.procs.get('slurmctld') and self.procs['slurmctld'].poll() is None:
            subprocess.run(['scancel', '--full', '--user=root'], capture_output=True,
                           check=False, timeout=30)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def wait_for_jobs(self, timeout: float) -> None:
        """Until no job is pending or running (RuntimeError after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while subprocess.run(['squeue', '-h', '-o', '%i'], capture_output=True,
                             text=True).stdout.strip():
            if time.monotonic() > deadline:
                queue = subprocess.run(['squeue'], capture_output=True, text=True).stdout
                raise RuntimeError(f'jobs still queued after {timeout:.0f} s:\n{queue}')
            time.sleep(1)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == '__main__':
    import sys

    cluster = Cluster(sys.argv[1] if len(sys.argv) > 1 else None).start()
    print(f'export SLURM_CONF={cluster.conf}   # SLURM is up; Ctrl-C stops it', flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
