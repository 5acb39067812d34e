"""How a run ends: its exit code and message from the failure records of cerebseg's interfaces
(never from the text of the crash files), and what is said when the graph stops early."""
from __future__ import annotations

import errno
import io
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from nipype.interfaces import utility as niu
from nipype.interfaces.base import BaseInterfaceInputSpec, TraitedSpec, traits
from nipype.pipeline import engine as pe

from cerebseg.bids_app import execution
from cerebseg.errors import BadDataError
from cerebseg.interfaces.base import FAILURE_RECORD, CerebsegInterface
from cerebseg.workflows.workdir import workflow_name


class _RaiseInputSpec(BaseInterfaceInputSpec):
    kind = traits.Str(mandatory=True, desc='what to raise (see Raise)')


class _RaiseOutputSpec(TraitedSpec):
    out = traits.Int(desc='1 when nothing was raised')


class Raise(CerebsegInterface):
    """Raises what ``kind`` says: ``bad-data``, ``disk-full``, ``quota``, ``wrapped`` (a disk
    error under another exception), ``lookalike`` (a bug whose text looks like the others);
    ``ok`` raises nothing."""

    input_spec = _RaiseInputSpec
    output_spec = _RaiseOutputSpec

    def _run_interface(self, runtime):
        kind = self.inputs.kind
        if kind == 'bad-data':
            raise BadDataError('The T1w sub-01_T1w.nii.gz is not a brain.')
        if kind in ('disk-full', 'quota'):
            code = errno.ENOSPC if kind == 'disk-full' else errno.EDQUOT
            raise OSError(code, os.strerror(code), 'sub-01_dseg.nii.gz')
        if kind == 'wrapped':
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as err:
                raise RuntimeError('could not save the label map') from err
        if kind == 'lookalike':
            raise ValueError('BadDataError: [Errno 28] No space left on device (only words)')
        self._results['out'] = 1
        return runtime


def _same(x):
    return x


def _fails(x):
    raise ValueError(f'a bug at {x}')


def _cfg(tmp_path, nprocs=1, stop=False, plugin=''):
    return SimpleNamespace(output_dir=str(tmp_path / 'out'), work_dir=str(tmp_path / 'work'),
                           run_uuid='uuid', nprocs=nprocs, mem_gb=0, verbose=0,
                           stop_on_first_crash=stop, plugin=plugin, plugin_args='')


def _run(label):
    return SimpleNamespace(label=label, subject=label[4:], session=None, t1w='', t2w='')


@pytest.fixture
def graph(monkeypatch):
    """``run_all`` on made-up runs: ``kinds[label]`` is what the run's ``Raise`` node does
    (``function``: a plain Nipype Function node fails instead; ``map``: a MapNode); returns
    the results and the reports written."""
    kinds, reports = {}, []

    def build(run, cfg, *args, **kwargs):
        wf = pe.Workflow(name=workflow_name(run.label))
        kind = kinds[run.label]
        if kind == 'function':
            node = pe.Node(niu.Function(input_names=['x'], output_names=['out'],
                                        function=_fails), name='step')
            node.inputs.x = 1
        elif kind == 'map':   # the second of two map subnodes has bad data
            node = pe.MapNode(Raise(), iterfield=['kind'], name='step')
            node.inputs.kind = ['ok', 'bad-data']
        else:
            node = pe.Node(Raise(kind=kind), name='step')
        after = pe.Node(niu.Function(input_names=['x'], output_names=['out'],
                                     function=_same), name='after')
        wf.connect(node, 'out', after, 'x')
        execution.send_crashes_to(wf, execution.crash_staging_dir(cfg, run))
        return wf

    monkeypatch.setattr(execution, 'build_participant_wf', build)
    monkeypatch.setattr(execution, 'prevalidate', lambda run: None)
    monkeypatch.setattr(execution, 'report_run',
                        lambda cfg, run, assets, **kw: reports.append((run.label, kw['code'])))

    def run_all(cfg, wanted: dict):
        kinds.clear()
        kinds.update(wanted)
        return execution.run_all(cfg, [_run(label) for label in wanted], None, {}, None,
                                 None), reports

    return run_all


@pytest.mark.parametrize('kind, code, message', [
    ('bad-data', 65, 'The T1w sub-01_T1w.nii.gz is not a brain.'),
    ('map', 65, 'The T1w sub-01_T1w.nii.gz is not a brain.'),
    ('disk-full', 74, 'while writing the outputs of cerebseg_wf.cerebseg_sub_01_wf.step'),
    ('quota', 74, 'no space left on the device (or disk quota exceeded)'),
    ('wrapped', 74, 'while writing the outputs of cerebseg_wf.cerebseg_sub_01_wf.step'),
    # the crash text names BadDataError and Errno 28, but the exception is a ValueError
    ('lookalike', 70, 'a processing step failed; see the crash files in'),
    ('function', 70, 'a processing step failed; see the crash files in'),
])
def test_exit_code_comes_from_the_exception(graph, tmp_path, kind, code, message):
    results, reports = graph(_cfg(tmp_path), {'sub-01': kind})
    assert results['sub-01'][0] == code and message in results['sub-01'][1], results
    assert reports == [('sub-01', code)]
    crashes = list((tmp_path / 'out' / 'sub-01' / 'log' / 'uuid').glob('crash-*.txt'))
    assert len(crashes) == 1, 'the crash file is still written for the user'


def test_multiproc_delivers_the_failed_nodes(graph, tmp_path):
    """MultiProc (spawned workers) reports the failed node to the progress as Linear does,
    a MapNode's failed subnode too (it runs as a job of its own, named ``_step1``): the
    bad-data runs end with 65, the other one finishes."""
    results, _ = graph(_cfg(tmp_path, nprocs=2),
                       {'sub-01': 'bad-data', 'sub-02': 'ok', 'sub-03': 'map'})
    assert results == {'sub-01': (65, 'The T1w sub-01_T1w.nii.gz is not a brain.'),
                       'sub-02': (0, 'done'),
                       'sub-03': (65, 'The T1w sub-01_T1w.nii.gz is not a brain.')}


def test_failure_record_and_stale_ones(tmp_path):
    node = pe.Node(Raise(kind='bad-data'), name='check', base_dir=str(tmp_path))
    with pytest.raises(Exception, match='is not a brain'):
        node.run()
    record = json.loads((Path(node.output_dir()) / FAILURE_RECORD).read_text())
    assert record == {'type': 'BadDataError', 'exit_code': 65, 'errno': None,
                      'message': 'The T1w sub-01_T1w.nii.gz is not a brain.', 'node': 'check'}
    folder = tmp_path / 'again'
    folder.mkdir()
    (folder / FAILURE_RECORD).write_text(json.dumps(record))   # left by an earlier command
    Raise(kind='ok').run(cwd=str(folder))
    assert not (folder / FAILURE_RECORD).exists(), 'a node that starts drops its old record'
    Raise(kind='disk-full').run(cwd=str(folder), ignore_exception=True)
    record = json.loads((folder / FAILURE_RECORD).read_text())
    assert (record['type'], record['exit_code'], record['errno']) == ('OSError', 74, 28)


def test_a_graph_that_does_not_start_is_not_silent(tmp_path, caplog):
    """The error of a graph that fails before any node (here: an unknown plugin) is logged
    as an error, not at DEBUG."""
    wf = pe.Workflow(name=workflow_name('sub-01'))
    wf.add_nodes([pe.Node(Raise(kind='ok'), name='step')])
    with caplog.at_level(logging.WARNING, logger='cerebseg'):
        progress = execution.run_workflows(
            _cfg(tmp_path, plugin='Nope'), {'sub-01': wf},
            execution.make_progress({'sub-01': wf}, stream=io.StringIO()))
    assert progress.runs['sub-01'].state == 'waiting'
    assert any(r.levelno >= logging.WARNING and 'NopePlugin' in r.getMessage()
               for r in caplog.records), caplog.text


def test_unfinished_run_says_why(graph, tmp_path):
    """A run that never ended is said to be stopped by --stop-on-first-crash only when that
    option was given."""
    results, _ = graph(_cfg(tmp_path, plugin='Nope'), {'sub-01': 'ok'})
    code, message = results['sub-01']
    assert code == 70 and '--stop-on-first-crash' not in message, message
    assert 'stopped before its last node' in message and 'NopePlugin' in message

    results, _ = graph(_cfg(tmp_path / 'stop', stop=True),
                       {'sub-01': 'bad-data', 'sub-02': 'ok'})
    assert results['sub-01'][0] == 65
    assert results['sub-02'] == (70, 'not finished: the run was stopped '
                                     '(--stop-on-first-crash)')


def test_slurm_graph_delivers_the_failed_nodes(tmp_path, monkeypatch):
    """cerebseg's SLURMGraph plugin gives the progress the failed node (read from its result
    file), whose record gives the exit code."""
    from cerebseg.bids_app import slurm
    from cerebseg.bids_app.outcome import run_outcome
    from cerebseg.bids_app.progress import Progress

    node = pe.Node(Raise(kind='bad-data'), name='step', base_dir=str(tmp_path / 'work'))
    with pytest.raises(Exception, match='is not a brain'):
        node.run()
    progress = Progress({'sub-01': 'step'}, {'sub-01': 1}, stream=io.StringIO())
    plugin = slurm.WaitingSLURMGraphPlugin({'status_callback': progress})
    monkeypatch.setattr(slurm, 'queued_jobs', lambda tag: [])
    plugin.nodes, plugin.outputs, plugin.submitted = [node], ['job.e'], 0
    plugin.wait()
    state = progress.runs['sub-01']
    assert state.failed and state.failures == [('step', node.output_dir())]
    code, message = run_outcome(_cfg(tmp_path), _run('sub-01'), state)
    assert (code, message) == (65, 'The T1w sub-01_T1w.nii.gz is not a brain.')


def test_every_interface_records_its_failures():
    """Each interface of cerebseg derives from CerebsegInterface (a new one that did not would
    end a bad-data run with 70)."""
    import importlib
    import pkgutil

    import cerebseg.interfaces
    from nipype.interfaces.base import BaseInterface

    missing = []
    for info in pkgutil.iter_modules(cerebseg.interfaces.__path__):
        module = importlib.import_module(f'cerebseg.interfaces.{info.name}')
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, BaseInterface) \
                    and obj.__module__ == module.__name__ and obj is not CerebsegInterface \
                    and not issubclass(obj, CerebsegInterface):
                missing.append(f'{module.__name__}.{name}')
    assert not missing, missing
