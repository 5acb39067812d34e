"""cerebseg on SLURM (issue 13): the node requests, then a real single-node SLURM started here
(``tests/slurm_cluster.py``: munge, slurmctld and slurmd as root) running participants through
``--plugin SLURM``, through ``--plugin SLURMGraph`` (with a participant that fails) and through
``scripts/slurm-array.sh``, each followed by the group step.

The cluster needs root and Debian's ``slurmctld slurmd slurm-client munge``; ``.ci/run``
installs them and sets ``CEREBSEG_REQUIRE_SLURM=1``, which turns a missing cluster into a
failure instead of a skip.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cerebseg.bids_app.slurm import node_sbatch_args, set_node_requests
from conftest import COARSE_FIT, REPO, SUIT, make_bids
from slurm_cluster import Cluster, unavailable


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def test_every_node_asks_slurm_for_what_it_declares(tmp_path):
    """--cpus-per-task from n_procs, --mem from mem_gb (at least 1 GB), the user's sbatch
    arguments last so that theirs win, replacing the plugin's global ones."""
    from nipype.pipeline import engine as pe
    from nipype.interfaces.utility import IdentityInterface

    wf = pe.Workflow('w')
    big = pe.Node(IdentityInterface(['a']), name='big', n_procs=4, mem_gb=6.5)
    small = pe.Node(IdentityInterface(['a']), name='small')
    wf.connect(big, 'a', small, 'a')
    assert node_sbatch_args(big) == '--cpus-per-task=4 --mem=6656M'
    assert node_sbatch_args(small) == '--cpus-per-task=1 --mem=1024M'
    set_node_requests([wf], '--comment=cerebseg:x --mem=20G')
    assert big.plugin_args == {'sbatch_args': ' --cpus-per-task=4 --mem=6656M '
                                              '--comment=cerebseg:x --mem=20G', 'overwrite': True}


@pytest.fixture(scope='module')
def slurm():
    reason = unavailable()
    if reason:
        if os.environ.get('CEREBSEG_REQUIRE_SLURM'):
            pytest.fail(f'CEREBSEG_REQUIRE_SLURM is set but SLURM cannot start: {reason}')
        pytest.skip(f'no SLURM here: {reason}')
    cluster = Cluster().start()
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)


def _jobs() -> list[dict]:
    """Every job the controller still knows (MinJobAge: ended ones for 5 minutes)."""
    out = subprocess.run(['scontrol', '-o', 'show', 'job'], capture_output=True, text=True)
    jobs = []
    for line in out.stdout.splitlines():
        fields = dict(item.split('=', 1) for item in line.split() if '=' in item)
        if 'JobId' in fields:
            jobs.append(fields)
    return jobs


def _command(*args) -> list[str]:
    return [sys.executable, '-m', 'cerebseg.bids_app.run', *map(str, args)]


def _group_rows(out: Path, seg: str = 'brainstem') -> list[str]:
    return (out / f'group_seg-{seg}_morph.tsv').read_text().splitlines()


@pytest.fixture(scope='module')
def plugin_run(slurm, ds002748_2mm, assets_dir, tmp_path_factory):
    """ds002748 01 and 02 at 2 mm (brainstem, one thread) through ``--plugin SLURM``."""
    bids = ds002748_2mm
    root = tmp_path_factory.mktemp('slurm-plugin')
    out, work = root / 'out', root / 'work'
    proc = subprocess.run(_command(bids, out, 'participant', '--participant-label', '01', '02',
                                   '-w', work, '--plugin', 'SLURM', '--plugin-args',
                                   '{"sbatch_args": "--time=0:30:00"}', '--assets-dir',
                                   assets_dir, *SUIT, *COARSE_FIT, '--skip-cerebellum',
                                   '--omp-nthreads', '1'),
                          capture_output=True, text=True, timeout=1500)
    return {'bids': bids, 'out': out, 'proc': proc, 'jobs': _jobs()}


@pytest.mark.integration
def test_slurm_plugin_runs_participants_and_group(slurm, plugin_run, tmp_path):
    """``--plugin SLURM``: every node is a SLURM job asking for its threads and memory and
    tagged with the run; both participants finish; the group step runs as a SLURM job too."""
    proc, out = plugin_run['proc'], plugin_run['out']
    assert proc.returncode == 0, proc.stderr[-5000:] + slurm.logs()
    assert 'Summary: 2 of 2 T1w run(s) finished' in proc.stderr
    run_uuid = next(out.glob('sub-01/log/*/sub-01_status.json')).parent.name
    jobs = [j for j in plugin_run['jobs'] if j.get('Comment', '').startswith('cerebseg:')]
    assert jobs and {j['Comment'] for j in jobs} == {f'cerebseg:{run_uuid}'}
    assert all(j['JobState'] == 'COMPLETED' for j in jobs), [j['JobState'] for j in jobs]
    assert all(j['TimeLimit'] == '00:30:00' for j in jobs)
    atlas = [j for j in jobs if j['JobName'].startswith('atlas.')]   # (node name first)
    assert len(atlas) == 2 and all(j['MinMemoryNode'] == '1G' and j['NumCPUs'] == '1'
                                   for j in atlas), atlas

    group = subprocess.run(['sbatch', '--wait', '--parsable', '-o', str(tmp_path / 'group.out'),
                            '--wrap', ' '.join(_command(plugin_run['bids'], out, 'group'))],
                           capture_output=True, text=True, timeout=600)
    assert group.returncode == 0, (tmp_path / 'group.out').read_text()
    assert len(_group_rows(out)) == 3


@pytest.mark.integration
def test_slurm_graph_plugin_reports_a_failed_participant(slurm, shared_data, ds002748_2mm,
                                                          assets_dir, tmp_path):
    """``--plugin SLURMGraph`` submits the whole graph at once; cerebseg waits for its jobs,
    cancels those whose dependencies failed (this cluster does not set kill_invalid_depend),
    and ends as with MultiProc: the brain is done, the non-brain phantom fails with exit 65,
    its crash file in its log folder, nothing left in the queue. (The end-to-end check that a
    non-brain is refused: the MNI affine's quality gate, which every participant passes.)"""
    root = make_bids(tmp_path / 'ds', {})
    for label, src in (('01', ds002748_2mm / 'sub-01/anat/sub-01_T1w.nii.gz'),
                       ('ph', shared_data / 'subjects/nonbrain_phantom/sub-ge01_T1w.nii.gz')):
        (root / f'sub-{label}/anat').mkdir(parents=True)
        shutil.copyfile(src, root / f'sub-{label}/anat/sub-{label}_T1w.nii.gz')
    out, work = tmp_path / 'out', tmp_path / 'work'
    proc = subprocess.run(_command(root, out, 'participant', '-w', work, '--assets-dir',
                                   assets_dir, *SUIT, *COARSE_FIT, '--skip-cerebellum',
                                   '--omp-nthreads', '1', '--plugin', 'SLURMGraph'),
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 65, proc.stderr[-5000:] + slurm.logs()
    assert 'does not fit the MNI152NLin2009cAsym template' in proc.stderr
    assert 'Summary: 1 of 2 T1w run(s) finished, 1 failed' in proc.stderr
    assert (out / 'sub-01/anat/sub-01_space-T1w_seg-brainstem_dseg.nii.gz').is_file()
    assert not list((out / 'sub-ph').rglob('*_dseg.nii.gz'))
    assert list(out.glob('sub-ph/log/*/crash-*.txt'))
    status = json.loads(next(out.glob('sub-ph/log/*/sub-ph_status.json')).read_text())
    assert status['exit_code'] == 65
    queue = subprocess.run(['squeue', '-h'], capture_output=True, text=True).stdout
    assert not queue.strip(), f'jobs left in the queue: {queue}'


@pytest.mark.integration
def test_job_array_script_runs_participants_then_group(slurm, plugin_run, ds002748_2mm,
                                                       assets_dir, tmp_path):
    """``scripts/slurm-array.sh``: one array task per participant (its CPUs and memory passed
    on to cerebseg, which runs there as on a workstation), then the group job after them.
    Participant 02's outputs are those of the ``--plugin SLURM`` run, byte for byte."""
    bids = ds002748_2mm
    out, work = tmp_path / 'out', tmp_path / 'work'
    env = dict(os.environ, PARTICIPANTS='sub-02 03', WORK_DIR=str(work),
               CEREBSEG=' '.join([sys.executable, '-m', 'cerebseg.bids_app.run']),
               SBATCH_ARGS='--cpus-per-task=1 --mem=2G --time=0:30:00')
    proc = subprocess.run(['bash', str(REPO / 'scripts/slurm-array.sh'), str(bids), str(out),
                           '--assets-dir', str(assets_dir), *SUIT, *COARSE_FIT,
                           '--skip-cerebellum'],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'job array' in proc.stdout and '(2 tasks' in proc.stdout
    slurm.wait_for_jobs(timeout=1500)
    logs = '\n'.join(p.read_text() for p in sorted((work / 'slurm').glob('*.out')))
    for label in ('02', '03'):
        assert (out / f'sub-{label}/anat/sub-{label}_space-T1w_seg-brainstem_dseg.nii.gz'
                ).is_file(), logs
        assert f'participant {label} (1 CPUs, 2 GB)' in logs
    assert len(_group_rows(out)) == 3, logs
    assert (out / 'group_report.html').is_file()
    in_task, per_node = _digest(out / 'sub-02/anat'), _digest(plugin_run['out'] / 'sub-02/anat')
    assert sorted(in_task) == sorted(per_node)
    assert [n for n in in_task if in_task[n] != per_node[n]] == [], \
        'the job array and the SLURM plugin give different outputs'
