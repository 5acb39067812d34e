"""Run a function in a fresh Python process with its own ITK/OpenMP thread count.

ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once per process, at its first filter: a
thread count set later (by a Nipype node running in a worker that has already run ANTs) is
silently ignored. ANTs' registration is only reproducible single-threaded (its metric sums
change order with the threads: two 2-thread runs of the same MNI affine differ in the third
decimal of the matrix, enough to move lobule volumes by up to 3 %). So the registration
nodes run their ITK work here, in a child process started with the thread count they ask for.

The child is ``python -m cerebseg.utils.isolate JOB RESULT``: ``JOB`` holds the pickled
function (module level) and arguments, ``RESULT`` receives the return value or the exception
(re-raised here with the child's traceback as a note) and the child's log records (re-emitted
here, so they land in the run's log as if logged in this process). The child dies with its
parent (``PR_SET_PDEATHSIG``, set by the child itself): a killed run leaves no registration
running.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

LOGGER = logging.getLogger('cerebseg.utils.isolate')

#: environment variables that fix the thread pools of ITK, OpenMP and the BLAS libraries
THREAD_VARIABLES = ('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', 'OMP_NUM_THREADS',
                    'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')


#: the parent's pid, given to the child so that it can tell whether its parent already died
PARENT_VARIABLE = 'CEREBSEG_ISOLATE_PARENT'


def _die_with_parent() -> None:
    """In the child, first thing: be killed when the parent dies (``PR_SET_PDEATHSIG``), and
    stop at once if it died before that was set. (Set here, not in a ``preexec_fn``: Python
    code between fork and exec can deadlock in a parent with threads, torch's among them.)"""
    if sys.platform != 'linux':
        return
    try:
        import ctypes

        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = os.environ.get(PARENT_VARIABLE)
    if parent and os.getppid() != int(parent):
        os._exit(1)


def child_environment(threads: int) -> dict[str, str]:
    """The environment of a child: this one, with ``threads`` in every thread variable, and
    this process's import path (this process's copy of cerebseg first), so that the child
    imports what this process imports."""
    import cerebseg

    env = dict(os.environ)
    env.update({name: str(max(int(threads), 1)) for name in THREAD_VARIABLES})
    env['ITK_GLOBAL_DEFAULT_THREADER'] = 'Platform'   # see registration.set_itk_environment
    package_root = str(Path(cerebseg.__file__).resolve().parent.parent)
    paths = [package_root] + [p for p in sys.path if p and p != package_root]
    env['PYTHONPATH'] = os.pathsep.join(dict.fromkeys(paths))
    env[PARENT_VARIABLE] = str(os.getpid())
    return env


def call_in_fresh_process(func, /, *args, threads: int = 1, **kwargs):
    """``func(*args, **kwargs)`` in a new Python process with ``threads`` ITK/OpenMP threads.

    ``func`` must be importable by name (a module-level function) and the arguments and the
    result picklable. An exception raised by ``func`` is raised here (same type); a child that
    dies without a result (killed, out of memory) raises :class:`RuntimeError` with its exit
    status.
    """
    with tempfile.TemporaryDirectory(prefix='cerebseg-child-') as tmp:
        job, result = os.path.join(tmp, 'job.pkl'), os.path.join(tmp, 'result.pkl')
        with open(job, 'wb') as fobj:
            pickle.dump((func, args, kwargs, logging.getLogger('cerebseg').getEffectiveLevel()),
                        fobj)
        proc = subprocess.run([sys.executable, '-m', 'cerebseg.utils.isolate', job, result],
                              env=child_environment(threads), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              check=False)
        if not os.path.exists(result):
            tail = proc.stderr.decode(errors='replace').strip()[-2000:]
            how = (f'was killed by signal {-proc.returncode}' if proc.returncode < 0
                   else f'exited with status {proc.returncode}')
            raise RuntimeError(
                f'the child process running {func.__module__}.{func.__qualname__} {how} '
                f'without a result (out of memory, or killed).' + (f'\n{tail}' if tail else ''))
        with open(result, 'rb') as fobj:
            status, payload, child_traceback, records = pickle.load(fobj)
    for name, level, message in records:
        logging.getLogger(name).log(level, '%s', message)
    if status == 'error':
        payload.add_note(f'In the child process (threads={threads}):\n{child_traceback}')
        raise payload
    return payload


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record):
        self.records.append((record.name, record.levelno, record.getMessage()))


def _child_main(job: str, result: str) -> int:
    _die_with_parent()
    handler = _ListHandler()
    with open(job, 'rb') as fobj:
        func, args, kwargs, level = pickle.load(fobj)
    logger = logging.getLogger('cerebseg')
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        out = ('ok', func(*args, **kwargs), '', handler.records)
        blob = pickle.dumps(out)
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent
        tb = traceback.format_exc()
        try:
            blob = pickle.dumps(('error', exc, tb, handler.records))
            pickle.loads(blob)
        except Exception:  # noqa: BLE001 - an exception that does not survive pickling
            blob = pickle.dumps(('error', RuntimeError(f'{type(exc).__name__}: {exc}'), tb,
                                 handler.records))
    tmp = result + '.part'
    with open(tmp, 'wb') as fobj:
        fobj.write(blob)
    os.replace(tmp, result)
    return 0


if __name__ == '__main__':
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
