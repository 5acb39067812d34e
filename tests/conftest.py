"""Shared fixtures: synthetic NIfTIs and BIDS trees, the real data folder, built assets."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault('NIPYPE_NO_ET', '1')
# as the command line does before any ITK filter (cerebseg.utils.registration.set_itk_environment):
# tests run the command in this process, where ITK reads its settings once
os.environ['ITK_GLOBAL_DEFAULT_THREADER'] = 'Platform'

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('CEREBSEG_SHARED_DATA', REPO.parent / 'shared' / 'data')).resolve()
#: the protocol of the session's assets (``assets_dir``: SUIT, 40 s to build; the default, cobra,
#: takes 8 min and is run end to end by test_real_anatomy): every command run on them says so
SUIT = ('--atlas-library', 'suit')
#: for the tests of how participants are run (scheduling, SLURM, concurrency, kill and resume,
#: a T2w refused), not of their labels: one coarse affine fit to MNI instead of four fine ones
#: (the T1w's and its mirror's, two starts each: 82 of the 125 s of a brainstem-only
#: participant at 2 mm on one thread). The default fit runs end to end in test_cli's real run
#: and test_real_anatomy
COARSE_FIT = ('--affine-fit', 'coarse')


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per CPU), each worker is pinned to a CPU
    of its own: the commands it runs see one CPU (``available_cpus``) and use one thread, instead
    of two workers each running two threads on two cores."""
    worker = os.environ.get('PYTEST_XDIST_WORKER', '')
    count = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '0') or 0)
    if not worker.startswith('gw') or not hasattr(os, 'sched_setaffinity'):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if count > 1 and len(cpus) >= count:
        share = len(cpus) // count
        index = int(worker[2:])
        os.sched_setaffinity(0, cpus[index * share:(index + 1) * share])


#: the test files that run whole participants, collected first, so that under pytest-xdist
#: (``--dist loadfile --no-loadscope-reorder``) the short files fill in beside them instead of a
#: long one starting last. xdist hands each worker two files at the start, the first and third
#: to one and the second and fourth to the other: test_real_anatomy (about 18 min on one core)
#: beside test_registration's short real-data tests, test_cli (14 min) beside test_slurm (5 min)
LONG_FIRST = ('test_real_anatomy.py', 'test_cli.py', 'test_registration.py', 'test_slurm.py')


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope='module')
def one_torch_thread():
    """One intra-op torch thread for a module of tiny convolutions (they run faster so on a busy
    2-core host); the previous count is restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_nifti(path, shape=(20, 20, 20), zooms=(1.0, 1.0, 1.0), data=None, dtype=np.float32):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        rng = np.random.default_rng(0)
        data = rng.random(shape).astype(dtype)
    affine = np.diag(list(zooms) + [1.0])
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def make_bad_nifti(path, case: str):
    """Write an image cerebseg must refuse: truncated, notnifti, 2d, 4d, nan, voxel, constant,
    slab."""
    import gzip

    path = Path(path)
    if case == 'truncated':
        good = make_nifti(path, shape=(40, 40, 40)).read_bytes()
        path.write_bytes(good[: len(good) // 3])
    elif case == 'notnifti':
        with gzip.open(path, 'wb') as fobj:
            fobj.write(b'this is not an image' * 100)
    elif case == '2d':
        make_nifti(path, data=np.random.rand(30, 30))
    elif case == '4d':
        make_nifti(path, data=np.random.rand(30, 30, 30, 4))
    elif case == 'nan':
        data = np.random.rand(30, 30, 30)
        data[1, 2, 3] = np.nan
        make_nifti(path, data=data)
    elif case == 'voxel':
        make_nifti(path, shape=(30, 30, 30), zooms=(1.0, 1.0, 50.0))
    elif case == 'constant':
        make_nifti(path, data=np.ones((20, 20, 20)))
    elif case == 'slab':
        make_nifti(path, data=np.random.rand(64, 64, 4))
    else:
        raise ValueError(case)
    return path


def make_bids(root, layout: dict, shape=(20, 20, 20)):
    """``layout``: {'01': ['anat/sub-01_T1w.nii.gz', ...]} (paths relative to sub-XX/)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / 'dataset_description.json').write_text(json.dumps(
        {'Name': 'synthetic', 'BIDSVersion': '1.10.0'}))
    for sub, files in layout.items():
        for rel in files:
            make_nifti(root / f'sub-{sub}' / rel, shape=shape)
    return root


@pytest.fixture(scope='session')
def shared_data():
    if not (SHARED / 'README.md').is_file():
        pytest.skip(f'real data not found at {SHARED} (set CEREBSEG_SHARED_DATA)')
    return SHARED


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A session's folder ``name`` made by ``build(folder)`` once for the whole run: under
    pytest-xdist the first worker that asks builds it in the run's shared base folder while the
    others wait on a lock, instead of every worker building its own (the SUIT assets: 70 s on
    two cores). Complete when its ``manifest.json`` is there (:func:`build_assets` writes it
    last); a build that failed is made again by the next worker that asks."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent                  # pytest-of-<user>/pytest-<n>: the workers' parent
    out = root / name
    with FileLock(f'{out}.lock'):
        if not (out / 'manifest.json').is_file():
            build(out)
    return out


@pytest.fixture(scope='session')
def assets_dir(shared_data, tmp_path_factory):
    """The SUIT atlas library built from ../shared/data once per run (70 s on two cores)."""
    from cerebseg.assets.build import build_assets

    prebuilt = os.environ.get('CEREBSEG_TEST_ASSETS')
    if prebuilt and (Path(prebuilt) / 'manifest.json').is_file():
        return Path(prebuilt)
    return built_once(tmp_path_factory, 'assets-suit',
                      lambda out: build_assets(shared_data, out, libraries=('suit',)))


@pytest.fixture(scope='session')
def strict_cobra_assets(shared_data, tmp_path_factory):
    """The cobra library without CoBrALab brain1 and without the MNI152NLin2009cAsym entry
    (the CoBra atlas has seen brain1): brain2, brain3 and their mirrors, for a case made from
    brain1 (test_real_anatomy, which also runs the shipped CERES network on it)."""
    from cerebseg.assets.build import build_assets

    out = tmp_path_factory.mktemp('assets-cobra-strict')
    build_assets(shared_data, out, libraries=('cobra',), brainstem=False,
                 skip_entries=['CoBrALab-brain1', 'MNI152NLin2009cAsym'])
    return out


@pytest.fixture(scope='session')
def ds002748_2mm(shared_data, tmp_path_factory):
    """ds002748 sub-01, 02 and 03 with their T1w resampled to 2 mm (linear), for the tests of
    scheduling and concurrency (SLURM, two commands), which test how participants are run, not
    their labels (with :data:`COARSE_FIT`)."""
    import shutil

    import nibabel as nib
    from nibabel.processing import resample_to_output

    src = shared_data / 'bids/ds002748'
    root = tmp_path_factory.mktemp('ds002748-2mm')
    shutil.copyfile(src / 'dataset_description.json', root / 'dataset_description.json')
    rows = (src / 'participants.tsv').read_text().splitlines()
    labels = ('01', '02', '03')
    (root / 'participants.tsv').write_text('\n'.join(
        [rows[0]] + [r for r in rows[1:] if r.split('\t')[0] in {f'sub-{x}' for x in labels}])
        + '\n')
    for label in labels:
        img = resample_to_output(nib.load(src / f'sub-{label}/anat/sub-{label}_T1w.nii.gz'),
                                 voxel_sizes=(2.0, 2.0, 2.0), order=1)
        anat = root / f'sub-{label}' / 'anat'
        anat.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine),
                 anat / f'sub-{label}_T1w.nii.gz')
    return root


def write_case_bids(root: Path, label: str, case, name: str) -> Path:
    """A one-participant BIDS dataset at ``root`` holding an exact-truth case's T1w
    (:func:`cerebseg.utils.truth.make_case`) as ``sub-<label>``."""
    import json

    import nibabel as nib

    anat = root / f'sub-{label}' / 'anat'
    anat.mkdir(parents=True)
    (root / 'dataset_description.json').write_text(json.dumps(
        {'Name': name, 'BIDSVersion': '1.10.0'}))
    nib.save(nib.Nifti1Image(np.rint(case.t1w).astype(np.int16), case.affine),
             anat / f'sub-{label}_T1w.nii.gz')
    return root
