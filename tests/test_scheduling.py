"""All T1w runs in one Nipype graph: a failing run stops only itself, progress and summary."""
from __future__ import annotations

import io
import os
import logging
from types import SimpleNamespace

import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.bids_app.progress import Progress
from cerebseg.bids_app.execution import make_progress, run_workflows
from cerebseg.bids_app.outcome import rerun_command, send_crashes_to


def _step(x):
    return x + 1


def _boom(x):
    raise ValueError(f'BadDataError: input {x} is not a brain')


def _run_wf(name, fail=False, steps=3):
    """``steps`` function nodes in a chain after an identity node (which Nipype drops from
    the graph it runs: the progress must not wait for it)."""
    wf = pe.Workflow(name=name)
    prev = pe.Node(niu.IdentityInterface(fields=['out']), name='inputnode')
    prev.inputs.out = 0
    for i in range(steps):
        func = _boom if (fail and i == 1) else _step
        node = pe.Node(niu.Function(input_names=['x'], output_names=['out'], function=func),
                       name=f'step{i}')
        wf.connect(prev, 'out', node, 'x')
        prev = node
    return wf


def _cfg(tmp_path, nprocs=2, stop=False):
    return SimpleNamespace(work_dir=str(tmp_path / 'work'), nprocs=nprocs, mem_gb=0,
                           verbose=0, stop_on_first_crash=stop)


@pytest.mark.parametrize('nprocs', [1, 2])
def test_failing_run_stops_only_itself(tmp_path, nprocs):
    workflows = {'sub-01': _run_wf('cerebseg_sub_01_wf'),
                 'sub-02': _run_wf('cerebseg_sub_02_wf', fail=True),
                 'sub-03': _run_wf('cerebseg_sub_03_wf')}
    for label, wf in workflows.items():
        send_crashes_to(wf, tmp_path / label / 'log')
    finished = []
    progress = make_progress(workflows, on_finished=finished.append, stream=io.StringIO())
    run_workflows(_cfg(tmp_path, nprocs), workflows, progress)
    assert sorted(finished) == ['sub-01', 'sub-03']
    assert {k: r.state for k, r in progress.runs.items()} == {
        'sub-01': 'done', 'sub-02': 'failed', 'sub-03': 'done'}
    # the crash file is in the failing run's own log folder, and only there
    crashes = list((tmp_path / 'sub-02' / 'log').glob('crash-*.txt'))
    assert len(crashes) == 1 and 'is not a brain' in crashes[0].read_text()
    assert not (tmp_path / 'sub-01' / 'log').exists()
    # one graph: the runs' nodes live side by side under the top-level workflow
    assert (tmp_path / 'work' / 'cerebseg_wf' / 'cerebseg_sub_03_wf' / 'step2').is_dir()


def test_stop_on_first_crash_stops_everything(tmp_path):
    workflows = {'sub-01': _run_wf('cerebseg_sub_01_wf', fail=True, steps=2),
                 'sub-02': _run_wf('cerebseg_sub_02_wf', steps=6)}
    for label, wf in workflows.items():
        send_crashes_to(wf, tmp_path / label / 'log')
    progress = make_progress(workflows, stream=io.StringIO())
    run_workflows(_cfg(tmp_path, nprocs=1, stop=True), workflows, progress)
    assert progress.runs['sub-01'].state == 'failed'
    assert progress.runs['sub-02'].state != 'done'


class _Node:
    def __init__(self, fullname):
        self.fullname = fullname


def test_progress_counts_eta_and_lines(caplog):
    now = [0.0]
    progress = Progress({'sub-01': 'top.a_wf', 'sub-02': 'top.b_wf'}, {'sub-01': 2, 'sub-02': 2},
                        stream=io.StringIO(), interval=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger='cerebseg'):
        progress(_Node('top.a_wf.preproc_wf.t1_correct'), 'start')
        assert progress.counts() == {'done': 0, 'running': 1, 'failed': 0, 'waiting': 1}
        assert progress.eta() is None
        now[0] = 10.0
        progress(_Node('top.a_wf.preproc_wf.t1_correct'), 'end')
        assert progress.eta() == pytest.approx(10.0 * 3)   # 10 s a node, 3 nodes left
        progress(_Node('top.a_wf.fuse'), 'start')
        progress(_Node('top.b_wf.t1_correct'), 'start')
        line = progress.line()
        assert '0 done, 2 running, 0 failed, 0 left' in line and 'elapsed 0:00:10' in line
        assert 'running: fuse, t1_correct' in line
        now[0] = 20.0
        progress(_Node('top.a_wf.fuse'), 'end')
        progress(_Node('top.b_wf.t1_correct'), 'exception')
        progress(_Node('top.b_wf.t1_correct'), 'end')   # nipype ends a failed node again
        progress(_Node('elsewhere.node'), 'start')        # not a run's node: ignored
    assert progress.counts() == {'done': 1, 'running': 0, 'failed': 1, 'waiting': 0}
    assert progress.runs['sub-02'].done == 0
    before = Progress({'sub-01': 'top.a_wf'}, {'sub-01': 2}, stream=io.StringIO(),
                      failed=['sub-03'])   # refused before the graph (bad input data)
    assert before.counts() == {'done': 0, 'running': 0, 'failed': 1, 'waiting': 1}
    assert '0 done, 0 running, 1 failed, 1 left' in before.line()
    assert 'sub-01: finished' in caplog.text and 'sub-02: failed at t1_correct' in caplog.text


def test_progress_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    progress = Progress({'sub-01': 'top.a_wf'}, {'sub-01': 4}, stream=stream)
    progress(_Node('top.a_wf.x'), 'start')
    progress(_Node('top.a_wf.x'), 'end')
    progress.close()
    text = stream.getvalue()
    assert '\r[######..................]' in text and text.endswith('\n')


def test_rerun_command_keeps_the_options():
    argv = ['/data', '/out', 'participant', '--participant-label', '01', '02', '03',
            '--nprocs', '2', '-w', '/work dir']
    assert rerun_command(argv, ['02']) == (
        "cerebseg /data /out participant --nprocs 2 -w '/work dir' --participant-label 02")
    assert rerun_command(['/d', '/o', 'participant'], ['01', '05']).endswith(
        'participant --participant-label 01 05')


@pytest.mark.parametrize('which', ['output', 'work'])
def test_unwritable_folders_stop_before_any_work(tmp_path, caplog, which):
    """A folder that cannot be created or written (here: a file in the way, which stops root
    too) ends the command with exit 2 and a message naming it, before any work."""
    from cerebseg.bids_app.run import main
    from conftest import make_bids

    bids = make_bids(tmp_path / 'bids', {'01': ['anat/sub-01_T1w.nii.gz']})
    blocker = tmp_path / 'a-file'
    blocker.write_text('not a folder')
    out = blocker / 'out' if which == 'output' else tmp_path / 'out'
    work = blocker / 'work' if which == 'work' else tmp_path / 'work'
    code = main([str(bids), str(out), 'participant', '-w', str(work)])
    assert code == 2
    bad = out if which == 'output' else work
    assert f'{which} folder {bad} is not writable' in caplog.text
    assert not (tmp_path / 'out' / 'dataset_description.json').exists()


def test_eta_learns_from_a_finished_run():
    now = [0.0]
    progress = Progress({k: f'top.{k}_wf' for k in 'abc'}, {k: 1 for k in 'abc'},
                        stream=io.StringIO(), clock=lambda: now[0])
    progress(_Node('top.a_wf.n'), 'start')
    now[0] = 5.0
    progress(_Node('top.b_wf.n'), 'start')
    now[0] = 10.0
    progress(_Node('top.a_wf.n'), 'end')
    # a run takes 10 node-seconds; b has run 5 of them, c none; 10 node-seconds in 10 s
    assert progress.eta() == pytest.approx(5.0 + 10.0)
    assert progress.counts() == {'done': 1, 'running': 1, 'failed': 0, 'waiting': 1}


def test_cached_nodes_end_without_a_start():
    """A resumed run: MultiProc ends its cached nodes without starting them."""
    finished = []
    progress = Progress({'sub-01': 'top.a_wf'}, {'sub-01': 2}, on_finished=finished.append,
                        stream=io.StringIO())
    progress(_Node('top.a_wf.x'), 'end')
    progress(_Node('top.a_wf.y'), 'end')
    assert finished == ['sub-01'] and progress.runs['sub-01'].state == 'done'


def test_resumed_run_is_finished(tmp_path):
    """The same graph twice in one work folder: the second run is all cached, and done."""
    for _ in range(2):
        workflows = {'sub-01': _run_wf('cerebseg_sub_01_wf')}
        finished = []
        progress = make_progress(workflows, on_finished=finished.append, stream=io.StringIO())
        run_workflows(_cfg(tmp_path, nprocs=2), workflows, progress)
        assert finished == ['sub-01']


_TORCH_PARENT = '''
import io, sys
from types import SimpleNamespace

import torch
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.bids_app.execution import make_progress, run_workflows

torch.set_num_threads(2)   # this process's OpenMP pool runs, as after training or inference
x = torch.randn(1, 1, 80, 80, 80)
for _ in range(3):
    torch.nn.functional.conv3d(x, torch.randn(4, 1, 3, 3, 3))


def conv(n):
    import torch
    torch.set_num_threads(2)
    x = torch.randn(1, 1, 64, 64, 64)
    return float(torch.nn.functional.conv3d(x, torch.ones(2, 1, 3, 3, 3)).mean()) + n


wf = pe.Workflow(name='cerebseg_sub_01_wf')
for i in range(2):
    node = pe.Node(niu.Function(input_names=['n'], output_names=['out'], function=conv),
                   name=f'conv{i}')
    node.inputs.n = i
    wf.add_nodes([node])
cfg = SimpleNamespace(work_dir=sys.argv[1], nprocs=2, mem_gb=0, verbose=0,
                      stop_on_first_crash=False, plugin='', plugin_args=sys.argv[2])
progress = run_workflows(cfg, {'sub-01': wf}, make_progress({'sub-01': wf},
                                                            stream=io.StringIO()))
print(progress.runs['sub-01'].state)
'''


def test_multiproc_workers_do_not_hang_after_torch_ran_here(tmp_path):
    """cerebseg run from a Python process whose torch has already run multi-threaded (the
    test suite after a training test; a notebook): forked workers would hang at their first
    parallel torch operation (GNU OpenMP is not fork-safe); MultiProc starts new
    interpreters instead. The run is a child process with a deadline, so a hang fails."""
    import subprocess
    import sys

    script = tmp_path / 'parent.py'
    script.write_text(_TORCH_PARENT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / 'work'), ''],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == 'done', proc.stderr[-3000:]


def test_freed_heap_memory_goes_back_to_the_system():
    """A worker's resident size follows what it runs now, not what earlier nodes freed: many
    small blocks (below glibc's mmap threshold) are freed, then the heap is trimmed (issue 13).
    """
    import subprocess
    import sys

    from cerebseg.utils.memory import release_freed_memory

    code = '''
import sys
from cerebseg.utils.memory import release_freed_memory

def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096

blocks = [bytearray(100_000) for _ in range(3000)]   # 300 MB on the heap
for b in blocks:
    b[0] = 1
before = rss()
keep = blocks[-1:]
del blocks
after_free = rss()
assert release_freed_memory()
after_trim = rss()
print(before, after_free, after_trim)
sys.exit(0 if after_trim < after_free - 200e6 else 1)
'''
    assert release_freed_memory() == sys.platform.startswith('linux')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize('bounded', [True, False])
def test_large_freed_blocks_are_not_kept(bounded):
    """With the fixed mmap threshold of every cerebseg process (``bound_heap``), blocks of
    tens of MB freed by a node are given back at once; with glibc's dynamic threshold, once a
    30 MB block was freed, 20 MB blocks come from the heap and stay resident after they are
    freed (what raised the cascade worker's peak by 0.5 GB, issue 13). The second case checks
    that the test can tell."""
    import subprocess
    import sys

    code = f'''
import os, sys
from cerebseg.utils.memory import bound_heap

def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096

if {bounded}:
    assert bound_heap() == 4 * 2 ** 20 and os.environ['MALLOC_MMAP_THRESHOLD_'] == str(2 ** 22)
big = bytearray(30_000_000)
del big
blocks = [bytearray(20_000_000) for _ in range(20)]
pin = [bytearray(1000) for _ in range(100)]
before = rss()
del blocks
freed = before - rss()
print(freed)
sys.exit(0 if freed > 300e6 else 1)
'''
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert (proc.returncode == 0) == bounded, proc.stdout + proc.stderr
