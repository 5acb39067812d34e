"""Helpers the end-to-end benchmarks share: running the real command, splitting its options."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def split_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[own args] -- [cerebseg options]`` -> (own args, cerebseg options)."""
    if '--' not in argv:
        return argv, []
    i = argv.index('--')
    return argv[:i], argv[i + 1:]


def run_cerebseg(bids: Path, out: Path, work: Path, assets: Path, extra: list[str],
                 log: Path) -> float:
    """``cerebseg BIDS OUT participant`` as a user runs it (2 processes, 2 threads), output to
    ``log``; raises with the log's path when it fails. Returns the wall time (s)."""
    cmd = [str(Path(sys.executable).with_name('cerebseg')), str(bids), str(out), 'participant',
           '--assets-dir', str(assets), '-w', str(work), '--nprocs', '2', '--omp-nthreads', '2',
           '--skip-bids-validation', *extra]
    tic = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, 'a') as fobj:
        code = subprocess.run(cmd, stdout=fobj, stderr=subprocess.STDOUT,
                              env=dict(os.environ, NIPYPE_NO_ET='1')).returncode
    if code:
        raise RuntimeError(f'{" ".join(cmd)} exited {code}; see {log}')
    return time.perf_counter() - tic
