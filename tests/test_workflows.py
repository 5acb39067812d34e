"""Workflow graphs built on tiny synthetic inputs (no processing) and interface specs."""
import importlib
import inspect

import pytest
from nipype.interfaces.base import BaseInterface
from nipype.pipeline.engine import MapNode
from nipype.pipeline.engine.utils import generate_expanded_graph

from cerebseg.utils.grid import WORKING_GRID
from cerebseg.workflows.base import init_single_subject_wf
from conftest import make_bids, make_nifti


@pytest.fixture
def fake_assets(tmp_path):
    files = {k: str(make_nifti(tmp_path / f'{k}.nii.gz', shape=(16, 16, 16)))
             for k in ('head', 'brain', 'mask', 'e1_t1', 'e1_dseg', 'e2_t1', 'e2_t2', 'e2_dseg')}
    lut = tmp_path / 'lut.tsv'
    lut.write_text('index\tname\tabbreviation\tcolor\n0\tbackground\tBG\t#000000\n')
    templates = {'head': files['head'], 'brain': files['brain'], 'mask': files['mask'],
                 'icv_ml': 1800.0}
    library = {'entries': [{'t1w': files['e1_t1'], 'dseg': files['e1_dseg']},
                           {'t1w': files['e2_t1'], 't2w': files['e2_t2'],
                            'dseg': files['e2_dseg']}],
               'n_labels': 35, 'lut': str(lut)}
    return templates, library


@pytest.mark.parametrize('with_t2,registration', [(False, 'torch'), (True, 'torch'),
                                                   (True, 'ants')])
def test_single_subject_graph(tmp_path, fake_assets, with_t2, registration):
    templates, library = fake_assets
    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz',
                                              'anat/sub-01_T2w.nii.gz']})
    t1w = str(root / 'sub-01/anat/sub-01_T1w.nii.gz')
    t2w = str(root / 'sub-01/anat/sub-01_T2w.nii.gz') if with_t2 else None
    wf = init_single_subject_wf(t1w=t1w, t2w=t2w, output_dir=str(tmp_path / 'out'),
                                templates=templates, grid=WORKING_GRID.to_dict(),
                                library=library, dseg_meta={'Mode': 'x'}, omp_nthreads=1,
                                seed=0, registration=registration, device='cpu')
    wf.base_dir = str(tmp_path / 'work')
    graph = generate_expanded_graph(wf._create_flat_graph())
    names = {n.fullname.split('.')[-1] for n in graph.nodes()}
    assert {'t1_correct', 'mni_affine', 'to_grid', 'fuse', 'to_native', 'volumes',
            'ds_dseg_native', 'ds_dseg_box', 'ds_morph', 'ds_t1_to_mni'} <= names
    register = next(n for n in graph.nodes() if n.fullname.endswith('.register'))
    assert len(register.inputs.entry_t1) == 2
    assert register.inputs.entry_t2 == ['', library['entries'][1]['t2w']]
    # ants: one registration per library entry; torch: all entries in one batch, throttled as a
    # GPU node when it runs on a GPU
    assert isinstance(register, MapNode) == (registration == 'ants')
    assert not register.is_gpu_node()
    assert ('t2_coreg' in names) == with_t2
    assert ('ds_t2_to_t1' in names) == with_t2
    assert not (tmp_path / 'out').exists(), 'building a graph must not write outputs'


INTERFACE_MODULES = ['cerebseg.interfaces.preproc', 'cerebseg.interfaces.multiatlas',
                     'cerebseg.interfaces.native', 'cerebseg.interfaces.bids',
                     'cerebseg.interfaces.registration']


def test_torch_node_declares_gpu(tmp_path, fake_assets):
    from cerebseg.workflows.multiatlas import init_multiatlas_wf

    _, library = fake_assets
    wf = init_multiatlas_wf(entries=library['entries'], n_labels=35, lut=library['lut'],
                            template_icv_ml=1800.0, reg_spacing=1.0, reg_iterations=[1],
                            omp_nthreads=1, seed=0, registration='torch', device='cuda:0',
                            use_gpu=True)
    assert wf.get_node('register').is_gpu_node()
    with pytest.raises(ValueError, match="'torch', 'ants' or 'both'"):
        init_multiatlas_wf(entries=library['entries'], n_labels=35, lut=library['lut'],
                           template_icv_ml=1800.0, reg_spacing=1.0, reg_iterations=[1],
                           omp_nthreads=1, seed=0, registration='elastix')


def test_both_registrations_fuse_all_entries(tmp_path, fake_assets):
    from cerebseg.workflows.multiatlas import init_multiatlas_wf

    _, library = fake_assets
    wf = init_multiatlas_wf(entries=library['entries'], n_labels=35, lut=library['lut'],
                            template_icv_ml=1800.0, reg_spacing=1.0, reg_iterations=[1],
                            omp_nthreads=1, seed=0, registration='both')
    wf.base_dir = str(tmp_path)
    graph = wf._create_flat_graph()
    fuse = wf.get_node('fuse')
    sources = {(u.name, d['connect'][0][1]) for u, v, d in graph.in_edges(
        [n for n in graph.nodes() if n.name == 'fuse'], data=True)}
    assert {('merge_warped_t1', 'warped_t1'), ('merge_warped_dseg', 'warped_dseg'),
            ('merge_warped_t2', 'warped_t2')} <= sources
    merge = wf.get_node('merge_warped_dseg')
    feeders = {u.name for u, v in graph.in_edges([n for n in graph.nodes() if n is merge or
                                                   n.name == 'merge_warped_dseg'])}
    assert feeders == {'register', 'register_ants'}
    assert fuse is not None


def _interfaces():
    for modname in INTERFACE_MODULES:
        mod = importlib.import_module(modname)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, BaseInterface) and cls.__module__ == modname:
                yield cls


@pytest.mark.parametrize('cls', list(_interfaces()), ids=lambda c: c.__name__)
def test_every_trait_is_described(cls):
    """A misspelt ``dec=`` passes silently in nipype: check every trait has ``desc``."""
    for spec in (cls.input_spec(), cls.output_spec()):
        for name, trait in spec.traits().items():
            if name.startswith('trait_') or name in ('ignore_exception',):
                continue
            assert trait.desc, f'{cls.__name__}.{name} has no desc'
    threaded = cls.input_spec().traits().get('num_threads')
    if threaded is not None:
        assert threaded.nohash, f'{cls.__name__}.num_threads must be nohash'
