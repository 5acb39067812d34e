"""Child processes with their own thread count (cerebseg.utils.isolate) and ANTs seeding."""
from __future__ import annotations

import logging
import os
import signal

import pytest

from cerebseg.errors import BadDataError
from cerebseg.utils.isolate import THREAD_VARIABLES, call_in_fresh_process


def child_threads():
    return {name: os.environ.get(name) for name in THREAD_VARIABLES}, os.getpid()


def child_raises(message):
    raise BadDataError(message)


def child_logs(text):
    logging.getLogger('cerebseg.test_isolate').warning('child says %s', text)
    return text.upper()


def child_dies():
    os.kill(os.getpid(), signal.SIGKILL)


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.b = b


def child_raises_unpicklable():
    raise Unpicklable('odd', 2)


def test_child_gets_its_thread_count():
    env, pid = call_in_fresh_process(child_threads, threads=3)
    assert pid != os.getpid()
    assert set(env.values()) == {'3'}
    env, _ = call_in_fresh_process(child_threads, threads=0)   # at least one thread
    assert set(env.values()) == {'1'}


def test_child_exception_is_raised_with_its_type_and_traceback():
    with pytest.raises(BadDataError, match='sub-01_T1w.nii.gz is not a brain') as info:
        call_in_fresh_process(child_raises, 'sub-01_T1w.nii.gz is not a brain')
    assert any('In the child process' in note and 'child_raises' in note
               for note in info.value.__notes__)


def test_unpicklable_exception_becomes_runtime_error():
    with pytest.raises(RuntimeError, match='Unpicklable: odd'):
        call_in_fresh_process(child_raises_unpicklable)


def test_child_log_records_reach_this_process(caplog):
    with caplog.at_level(logging.INFO, logger='cerebseg'):
        assert call_in_fresh_process(child_logs, 'hello') == 'HELLO'
    assert 'child says hello' in caplog.text


def test_killed_child_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match='killed by signal 9'):
        call_in_fresh_process(child_dies)


def child_sleeps(pid_file):
    import time

    with open(pid_file, 'w') as fobj:
        fobj.write(str(os.getpid()))
    time.sleep(120)


def test_child_dies_with_its_parent(tmp_path):
    """``kill -9`` of the process that started the child (a Nipype worker) kills the child
    too: a killed run leaves no registration running."""
    import subprocess
    import sys
    import time

    pid_file = tmp_path / 'child.pid'
    parent = subprocess.Popen([sys.executable, '-c', (
        'import sys; sys.path.insert(0, sys.argv[1]); import test_isolate; '
        'from cerebseg.utils.isolate import call_in_fresh_process; '
        'call_in_fresh_process(test_isolate.child_sleeps, sys.argv[2])'),
        os.path.dirname(__file__), str(pid_file)])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline and parent.poll() is None, 'no child started'
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f'/proc/{child}/stat') as fobj:   # a zombie is dead
            if fobj.read().rsplit(')', 1)[1].split()[0] == 'Z':
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError('the child outlived its killed parent')


def test_ants_seed_is_never_zero():
    """antsRegistration seeds from the clock when given 0: cerebseg's seeds are shifted."""
    from cerebseg.utils.registration import ants_random_seed, ants_seed

    assert [ants_random_seed(s) for s in (0, 1, 41)] == [1, 2, 42]
    assert ants_random_seed(2 ** 31 - 2) > 0
    import ants.config

    with ants_seed(0):
        assert ants.config._random_seed == 1
    assert ants.config._random_seed is None
