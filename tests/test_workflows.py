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
               'n_labels': 35, 'lut': str(lut), 'name': 'suit'}
    return templates, library


def write_fake_weights(folder, labels, protocol='suit', variants=('T1w+prior', 'T1w+T2w+prior')):
    """A weights manifest of tiny random networks (every variant, hemisphere + U-Net + DPN)."""
    import json

    from cerebseg.models import nets3d as seg
    from cerebseg.models.checkpoint import save_cascade_net
    from cerebseg.utils.labels import HEMISPHERE_LABELS

    folder.mkdir(parents=True, exist_ok=True)
    spec = {'protocol': protocol, 'variants': {}}
    for variant in variants:
        inputs = variant.split('+')
        tag = variant.replace('+', '-')
        stages = {}
        for stage, stage_labels, spacing, archs in (
                ('hemisphere', HEMISPHERE_LABELS, 1.0, ['dpn']),
                ('lobules', labels, 0.5, ['unet', 'dpn'])):
            entries = []
            for arch in archs:
                n_in = seg.n_input_channels(inputs, len(stage_labels) - 1)
                model = seg.build_model(arch, n_in, len(stage_labels), features=[4, 4])
                name = f'{stage}_{arch}_{tag}.pt'
                save_cascade_net(folder / name, model, architecture=arch, inputs=inputs,
                                 stage=stage, labels=stage_labels, spacing=spacing,
                                 protocol=protocol, half=True)
                entries.append({'file': name, 'architecture': arch, 'inputs': inputs})
            stages[stage] = entries
        spec['variants'][variant] = stages
    (folder / 'deepceres.json').write_text(json.dumps(spec))
    return folder / 'deepceres.json'


def _subject_graph(tmp_path, fake_assets, with_t2, **kwargs):
    """The participant workflow of a tiny synthetic T1w (and T2w) with the fake library."""
    templates, library = fake_assets
    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz',
                                              'anat/sub-01_T2w.nii.gz']})
    t1w = str(root / 'sub-01/anat/sub-01_T1w.nii.gz')
    t2w = str(root / 'sub-01/anat/sub-01_T2w.nii.gz') if with_t2 else None
    wf = init_single_subject_wf(t1w=t1w, t2w=t2w, output_dir=str(tmp_path / 'out'),
                                templates=templates, grid=WORKING_GRID.to_dict(),
                                library=library, dseg_meta={'Mode': 'x'}, omp_nthreads=1,
                                seed=0, **kwargs)
    wf.base_dir = str(tmp_path / 'work')
    return wf


@pytest.mark.parametrize('with_t2,registration', [(False, 'torch'), (True, 'torch'),
                                                   (True, 'ants')])
def test_single_subject_graph(tmp_path, fake_assets, with_t2, registration):
    templates, library = fake_assets
    wf = _subject_graph(tmp_path, fake_assets, with_t2, registration=registration,
                        device='cpu')
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
    if registration == 'torch':   # its settings are hashed: changing them recomputes the node
        from cerebseg import __version__

        assert 'SVFConfig(' in register.inputs.settings
        assert f'cerebseg {__version__}' in register.inputs.settings
    assert ('t2_coreg' in names) == with_t2
    assert ('ds_t2_to_t1' in names) == with_t2
    # the field of view is judged on the library entries' labels as the affine places them;
    # its report reaches the volume table and the sidecar
    fov = next(n for n in graph.nodes() if n.fullname.endswith('native_wf.fov'))
    assert fov.inputs.label_maps == [e['dseg'] for e in library['entries']]
    assert fov.inputs.structure == 'cerebellum'
    feeds = {(u.fullname.split('.')[-1], v.fullname.split('.')[-1]) for u, v in graph.edges()}
    assert ('fov', 'volumes') in feeds and ('fov', 'qc_files') in feeds
    # the report figures: registration checks and the native label mosaic, into figures/
    assert {'mni_rpt', 'cerebellum_rpt', 'ds_mni_report', 'ds_cerebellum_report'} <= names
    assert ({'t2w_rpt', 'ds_t2w_report'} <= names) == with_t2
    assert 'brainstem_rpt' not in names
    sink = next(n for n in graph.nodes() if n.fullname.endswith('.ds_cerebellum_report'))
    assert sink.inputs.datatype == 'figures' and sink.inputs.extension == '.svg'
    assert not (tmp_path / 'out').exists(), 'building a graph must not write outputs'


def _nodes_and_feeds(wf):
    """The expanded graph's nodes by short name, and its edges as (from, to) short names."""
    graph = generate_expanded_graph(wf._create_flat_graph())
    by_name = {n.fullname.split('.')[-1]: n for n in graph.nodes()}
    feeds = {(u.fullname.split('.')[-1], v.fullname.split('.')[-1]) for u, v in graph.edges()}
    return by_name, feeds


@pytest.mark.parametrize('outline', ['fused', 'trimmed', 'tissue'])
def test_outline_trimming_node(tmp_path, fake_assets, outline):
    """--outline: the native labels pass through trim_outline, which reads the bias-corrected
    T1w (and, to grow the outline, the structure's native probability from to_native), before
    the volumes are counted and the labels written; its report goes to the sidecar. Without
    it the graph is as before."""
    trim = outline != 'fused'
    wf = _subject_graph(tmp_path, fake_assets, False, outline=outline,
                        **({'reg_control_mm': 2.0} if trim else {}))
    by_name, feeds = _nodes_and_feeds(wf)
    assert ('trim_outline' in by_name) == trim
    first = 'trim_outline' if trim else 'to_native'
    assert (first, 'volumes') in feeds and (first, 'ds_dseg_native') in feeds
    assert (first, 'cerebellum_rpt') in feeds
    assert by_name['register'].inputs.control_mm == (2.0 if trim else 4.0)  # protocol's grid
    assert by_name['to_native'].inputs.foreground is (outline == 'tissue')
    if trim:
        assert ('to_native', 'trim_outline') in feeds
        assert ('t1_correct', 'trim_outline') in feeds
        assert ('trim_outline', 'qc_files') in feeds
        assert ('to_native', 'volumes') not in feeds
        native_wf = wf.get_node('native_wf')
        fields = native_wf._graph.get_edge_data(native_wf.get_node('to_native'),
                                                native_wf.get_node('trim_outline'))['connect']
        assert (('foreground', 'foreground') in fields) == (outline == 'tissue')
    with pytest.raises(ValueError, match='fused, trimmed or tissue'):
        _subject_graph(tmp_path / 'bad', fake_assets, False, outline='grown')


@pytest.mark.parametrize('moved', [False, True])
def test_branch_borders_node(tmp_path, fake_assets, moved):
    """--lobule-borders branches: the fused labels and probabilities pass through
    branch_borders, which reads the working-grid T1w, before the native labels and the
    box derivative; its report goes to the sidecar. Without it the graph is as before."""
    branches = {'units': [0, 1, 2, 0], 'sides': [0, 1, 1, 1]} if moved else None
    wf = _subject_graph(tmp_path, fake_assets, False, branches=branches)
    by_name, feeds = _nodes_and_feeds(wf)
    assert ('branch_borders' in by_name) == moved
    last = 'branch_borders' if moved else 'fuse'
    assert (last, 'to_native') in feeds and (last, 'ds_dseg_box') in feeds
    if moved:
        assert by_name['branch_borders'].inputs.units == [0, 1, 2, 0]
        assert {('fuse', 'branch_borders'), ('to_grid', 'branch_borders'),
                ('branch_borders', 'qc_files')} <= feeds
        assert ('fuse', 'to_native') not in feeds
    assert 'register_votes' not in by_name and 'fuse_votes' not in by_name


def test_lobule_votes_nodes(tmp_path, fake_assets):
    """A library with lobule votes: their entries are registered and fused apart from the
    library's (labels = units), and their probabilities reach branch_borders with the
    weight; the library's own fusion is as before."""
    entry = {'t1w': str(make_nifti(tmp_path / 'v_t1.nii.gz')),
             'dseg': str(make_nifti(tmp_path / 'v_dseg.nii.gz'))}
    votes = {'entries': [entry, entry], 'n_labels': 3, 'weight': 0.25, 'protocol': 'suit',
             'names': ['a', 'aMirror'], 'control_mm': 4.0}
    wf = _subject_graph(tmp_path, fake_assets, False, reg_control_mm=2.0,
                        branches={'units': [0, 1, 2, 0], 'sides': [0, 1, 1, 1], 'votes': votes})
    by_name, feeds = _nodes_and_feeds(wf)
    assert {('register_votes', 'fuse_votes'), ('fuse_votes', 'branch_borders'),
            ('fuse', 'branch_borders'), ('register', 'fuse'),
            ('to_grid', 'register_votes')} <= feeds
    assert ('register_votes', 'fuse') not in feeds and ('register', 'fuse_votes') not in feeds
    assert by_name['register_votes'].inputs.entry_t1 == [entry['t1w']] * 2
    # each library registered on its own protocol's control grid
    assert by_name['register'].inputs.control_mm == 2.0
    assert by_name['register_votes'].inputs.control_mm == 4.0
    assert by_name['fuse_votes'].inputs.n_labels == 3
    assert by_name['fuse_votes'].inputs.search == 0
    assert by_name['branch_borders'].inputs.votes_weight == 0.25


def test_brainstem_graph(tmp_path, fake_assets):
    """The brainstem branch: its own box from the shared affine, atlas, native, outputs."""
    from cerebseg.utils.grid import BRAINSTEM_GRID

    files = {k: str(make_nifti(tmp_path / f'bs_{k}.nii.gz', shape=(8, 8, 8)))
             for k in ('t1w', 'dseg')}
    lut = tmp_path / 'bs_lut.tsv'
    lut.write_text('index\tname\tabbreviation\tcolor\tpart\n0\tbackground\tBG\t#000000\tn/a\n')
    brainstem = dict(files, lut=str(lut), n_labels=17, grid=BRAINSTEM_GRID.to_dict())
    wf = _subject_graph(tmp_path, fake_assets, False, brainstem=brainstem,
                        brainstem_meta={'Mode': 'T1w'})
    graph = generate_expanded_graph(wf._create_flat_graph())
    nodes = {n.fullname.split('.', 1)[1]: n for n in graph.nodes()}
    assert {'preproc_wf.to_bs_grid', 'brainstem_wf.atlas', 'brainstem_wf.native_wf.to_native',
            'brainstem_wf.native_wf.volumes', 'brainstem_wf.ds_wf.ds_dseg_native',
            'brainstem_wf.ds_wf.ds_dseg_box', 'brainstem_wf.ds_wf.ds_morph'} <= set(nodes)
    assert nodes['brainstem_wf.native_wf.volumes'].inputs.parts
    assert nodes['brainstem_wf.native_wf.fov'].inputs.label_maps == [files['dseg']]
    assert nodes['brainstem_wf.native_wf.fov'].inputs.structure == 'brainstem'
    assert {'reports_wf.brainstem_rpt', 'reports_wf.cerebellum_rpt',
            'reports_wf.ds_reports_wf.ds_brainstem_report'} <= set(nodes)
    assert nodes['brainstem_wf.ds_wf.ds_morph'].inputs.entities == {'seg': 'brainstem'}
    assert 'brainstem_wf.ds_wf.ds_t1_to_mni' not in nodes, 'the cerebellum writes it'
    # brainstem only: no working grid, no cerebellar fusion or outputs; the affine stays
    wf = _subject_graph(tmp_path / 'bs', fake_assets, True, brainstem=brainstem,
                        brainstem_meta={}, cerebellum=False)
    names = {n.fullname.split('.', 1)[1] for n in
             generate_expanded_graph(wf._create_flat_graph()).nodes()}
    assert {'preproc_wf.box_affine', 'preproc_wf.to_bs_grid', 'brainstem_wf.atlas',
            'brainstem_wf.ds_wf.ds_t1_to_mni'} <= names
    assert not names & {'preproc_wf.to_grid', 'preproc_wf.t2_coreg', 'multiatlas_wf.fuse',
                        'native_wf.to_native', 'ds_wf.ds_morph', 'reports_wf.cerebellum_rpt',
                        'reports_wf.t2w_rpt'}
    assert {'reports_wf.brainstem_rpt', 'reports_wf.mni_rpt'} <= names
    # the network instead of the atlas: the same outputs, from its node
    net = dict(brainstem, method='network', weights=files['t1w'])
    wf = _subject_graph(tmp_path / 'net', fake_assets, False, brainstem=net,
                        brainstem_meta={}, cerebellum=False)
    graph = generate_expanded_graph(wf._create_flat_graph())
    nodes = {n.fullname.split('.', 1)[1]: n for n in graph.nodes()}
    assert 'brainstem_wf.network' in nodes and 'brainstem_wf.atlas' not in nodes
    assert nodes['brainstem_wf.network'].inputs.weights == files['t1w']
    assert {'brainstem_wf.native_wf.to_native', 'brainstem_wf.ds_wf.ds_dseg_box'} <= set(nodes)
    assert nodes['brainstem_wf.native_wf.to_native'].inputs.foreground_first
    with pytest.raises(ValueError, match='Nothing to segment'):
        _subject_graph(tmp_path / 'x', fake_assets, False, cerebellum=False)
    # without it, no brainstem node at all
    wf = _subject_graph(tmp_path / 'none', fake_assets, False)
    names = {n.fullname for n in generate_expanded_graph(wf._create_flat_graph()).nodes()}
    assert not any('brainstem' in n or 'to_bs_grid' in n for n in names)


INTERFACE_MODULES = ['cerebseg.interfaces.preproc', 'cerebseg.interfaces.multiatlas',
                     'cerebseg.interfaces.brainstem',
                     'cerebseg.interfaces.native', 'cerebseg.interfaces.bids',
                     'cerebseg.interfaces.registration', 'cerebseg.interfaces.segmentation',
                     'cerebseg.interfaces.reports']


def test_torch_node_declares_gpu(tmp_path, fake_assets):
    from cerebseg.workflows.multiatlas import init_multiatlas_wf

    _, library = fake_assets
    wf = init_multiatlas_wf(entries=library['entries'], n_labels=35,
                            reg_spacing=1.0, reg_iterations=[1],
                            omp_nthreads=1, seed=0, registration='torch', device='cuda:0',
                            use_gpu=True)
    assert wf.get_node('register').is_gpu_node()
    with pytest.raises(ValueError, match="'torch', 'ants' or 'both'"):
        init_multiatlas_wf(entries=library['entries'], n_labels=35,
                           reg_spacing=1.0, reg_iterations=[1],
                           omp_nthreads=1, seed=0, registration='elastix')


def test_both_registrations_fuse_all_entries(tmp_path, fake_assets):
    from cerebseg.workflows.multiatlas import init_multiatlas_wf

    _, library = fake_assets
    wf = init_multiatlas_wf(entries=library['entries'], n_labels=35,
                            reg_spacing=1.0, reg_iterations=[1],
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


@pytest.mark.parametrize('with_t2,models', [(False, 'ensemble'), (True, 'ensemble'),
                                             (False, 'dpn')])
def test_cnn_graph(tmp_path, fake_assets, with_t2, models):
    from cerebseg.models.checkpoint import select_weights

    templates, library = fake_assets
    labels = [[0, 'background']] + [[i, f'Left_{i}' if i % 2 else f'Right_{i - 1}']
                                    for i in range(1, 35)]
    manifest = write_fake_weights(tmp_path / 'weights', labels)
    cnn = select_weights(manifest, t2w=with_t2, prior=True, models=models)
    assert cnn['variant'] == ('T1w+T2w+prior' if with_t2 else 'T1w+prior')
    assert len(cnn['lobules']['files']) == (2 if models == 'ensemble' else 1)
    wf = _subject_graph(tmp_path, fake_assets, with_t2, cnn=cnn)
    graph = generate_expanded_graph(wf._create_flat_graph())
    names = {n.fullname.split('.')[-1] for n in graph.nodes()}
    assert {'cascade', 'fuse', 'to_native', 'ds_dseg_prior_box', 'ds_uncertainty'} <= names
    cascade = next(n for n in graph.nodes() if n.name == 'cascade')
    # the networks' probabilities (not the fused ones) go to native space, with uncertainty
    feeds = {(u.name, v.name) for u, v in graph.edges()}
    assert ('cascade', 'to_native') in feeds and ('fuse', 'to_native') not in feeds
    assert ('cascade', 'volumes') in feeds and ('fuse', 'cascade') in feeds
    assert ('to_grid', 'cascade') in feeds
    assert cascade.inputs.lobule_inputs == cnn['lobules']['inputs']


def test_weights_selection_errors(tmp_path):
    from cerebseg.models.checkpoint import select_weights
    from cerebseg.models.checkpoint import CheckpointError

    labels = [[0, 'background'], [1, 'Left_A'], [2, 'Right_A']]
    manifest = write_fake_weights(tmp_path / 'w', labels, variants=('T1w+prior',))
    with pytest.raises(CheckpointError, match='no weights for the inputs T1w\\+T2w\\+prior.*'
                                              '--t1-only'):
        select_weights(manifest, t2w=True, prior=True)
    with pytest.raises(CheckpointError, match='inputs T1w;.*--no-atlas-prior'):
        select_weights(manifest, t2w=False, prior=False)
    with pytest.raises(CheckpointError, match='cobra'):
        select_weights(manifest, t2w=False, prior=True, protocol='cobra')
    with pytest.raises(CheckpointError, match='manifest not found'):
        select_weights(tmp_path / 'nope.json', t2w=False, prior=True)
    (tmp_path / 'w' / 'lobules_unet_T1w-prior.pt').unlink()
    with pytest.raises(CheckpointError, match='weights not found.*lobules_unet'):
        select_weights(manifest, t2w=False, prior=True)
    assert CheckpointError.exit_code == 126


def _interfaces():
    for modname in INTERFACE_MODULES:
        mod = importlib.import_module(modname)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if (issubclass(cls, BaseInterface) and cls.__module__ == modname
                    and not cls.__name__.startswith('_')):   # private bases have no specs
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


def test_prior_graph_feeds_the_t1w(tmp_path, fake_assets):
    """The training-data graph (cerebseg-train) reaches the same preprocessing with its T1w."""
    from cerebseg.workflows.base import init_prior_wf

    templates, library = fake_assets
    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz']})
    t1w = str(root / 'sub-01/anat/sub-01_T1w.nii.gz')
    subject_t1w = str(tmp_path / 'subject' / 'ds' / 'sub-01/anat/sub-01_T1w.nii.gz')
    for wf, expected in ((init_prior_wf(t1w=t1w, t2w=None, templates=templates,
                                        grid=WORKING_GRID.to_dict(), library=library,
                                        omp_nthreads=1, seed=0, reg_control_mm=2.0), t1w),
                         (_subject_graph(tmp_path / 'subject', fake_assets, False,
                                         reg_control_mm=2.0), subject_t1w)):
        graph = generate_expanded_graph(wf._create_flat_graph())
        correct = next(n for n in graph.nodes() if n.fullname.endswith('.t1_correct'))
        assert correct.inputs.in_file == expected
        register = next(n for n in graph.nodes() if n.fullname.endswith('.register'))
        assert register.inputs.control_mm == 2.0     # training priors as the runs make them


@pytest.mark.parametrize('symmetric, coarse', [(True, False), (False, False), (False, True)])
def test_affine_fit_reaches_both_affine_nodes(tmp_path, fake_assets, symmetric, coarse):
    """``--affine-fit``: the whole-brain affine and its box refinement both fit the T1w and its
    mirror (symmetric, the default), or neither does; each uses two cores for its two fits;
    coarse reaches the whole-brain affine."""
    wf = _subject_graph(tmp_path, fake_assets, False, device='cpu', symmetric_affine=symmetric,
                        coarse_affine=coarse)
    nodes, _ = _nodes_and_feeds(wf)
    for name in ('mni_affine', 'box_affine'):
        assert nodes[name].inputs.symmetric is symmetric
    assert nodes['mni_affine'].inputs.coarse is coarse
    assert nodes['box_affine'].n_procs == 1      # omp_nthreads=1: one fit at a time


def test_training_prior_is_the_runs_prior(tmp_path, fake_assets):
    """The training-data graph makes the prior a run gives the networks: the same fusion
    settings on the fuse node and, with the borders on the branches, the branch node (and its
    votes) between the fusion and the prior; without them the fused prior."""
    from cerebseg.workflows.base import init_prior_wf

    templates, library = fake_assets
    t1w = str(make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz']})
              / 'sub-01/anat/sub-01_T1w.nii.gz')
    votes = {'entries': library['entries'][:1], 'n_labels': 3, 'weight': 0.5}
    branches = {'units': [0, 1, 2], 'sides': [0, 1, 2], 'votes': votes}
    wf = init_prior_wf(t1w=t1w, t2w=None, templates=templates, grid=WORKING_GRID.to_dict(),
                       library=library, omp_nthreads=1, seed=0, fusion_search=1,
                       fusion_nonlocal_weight=0.5, white_labels=[13, 26], branches=branches)
    nodes, feeds = _nodes_and_feeds(wf)
    fuse = nodes['fuse']
    assert (fuse.inputs.search, fuse.inputs.nonlocal_weight, fuse.inputs.white_labels) == \
        (1, 0.5, [13, 26])
    assert {('fuse', 'branch_borders'), ('fuse_votes', 'branch_borders'),
            ('branch_borders', 'outputnode')} <= feeds
    assert nodes['branch_borders'].inputs.votes_weight == 0.5
    nodes, feeds = _nodes_and_feeds(init_prior_wf(
        t1w=t1w, t2w=None, templates=templates, grid=WORKING_GRID.to_dict(), library=library,
        omp_nthreads=1, seed=0))
    assert 'branch_borders' not in nodes and ('fuse', 'outputnode') in feeds
    assert (nodes['fuse'].inputs.search, nodes['fuse'].inputs.white_labels) == (0, [])


def test_fusion_settings_reach_the_fuse_node(tmp_path, fake_assets):
    """The fusion a run resolves (search, non-local share, white labels whose levels are
    matched) is what the fuse node gets; the defaults are local voting, unmatched."""
    wf = _subject_graph(tmp_path / 'a', fake_assets, False, device='cpu', fusion_search=1,
                        fusion_nonlocal_weight=0.5, white_labels=[13, 26])
    fuse = _nodes_and_feeds(wf)[0]['fuse']
    assert (fuse.inputs.search, fuse.inputs.nonlocal_weight) == (1, 0.5)
    assert fuse.inputs.white_labels == [13, 26]
    fuse = _nodes_and_feeds(_subject_graph(tmp_path / 'b', fake_assets, False,
                                           device='cpu'))[0]['fuse']
    assert (fuse.inputs.search, fuse.inputs.nonlocal_weight, fuse.inputs.white_labels) == \
        (0, 1.0, [])
