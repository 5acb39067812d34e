"""Command-line parsing (exit code 2 on usage errors)."""
import pytest

from cerebseg.bids_app.parser import parse_args
from conftest import make_bids


@pytest.fixture
def bids(tmp_path):
    return make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz']})


def test_default_threads_are_the_cpus_this_process_may_use(bids, tmp_path, monkeypatch):
    """A SLURM job or ``taskset`` gives the process fewer CPUs than the host has: --nprocs and
    --omp-nthreads default to those (os.cpu_count() would oversubscribe them)."""
    import os

    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {3}, raising=False)
    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant'])
    assert opts.nprocs == 1 and opts.omp_nthreads == 1
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2}, raising=False)
    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant'])
    assert opts.nprocs == 3 and opts.omp_nthreads == 3


def test_defaults_and_label_prefix(bids, tmp_path):
    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant',
                       '--participant_label', 'sub-01', '02', '--nprocs', '2'])
    assert opts.participant_label == ['01', '02']
    assert opts.nprocs == 2 and opts.omp_nthreads == 2
    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant',
                       '--participant-label', '01', '--session-label', 'ses-a'])
    assert opts.participant_label == ['01'] and opts.session_label == ['a']
    assert opts.fusion_search == 'auto' and opts.fusion_nonlocal_weight == 'auto'
    # the CERES protocol (cobra) is the default, chosen on the real-anatomy benchmark; SUIT is
    # one option away; the configuration file of a run says which ran
    from cerebseg.bids_app.config import RunConfig

    assert opts.atlas_library == 'cobra'
    assert RunConfig('b', 'o', 'w', 'participant').atlas_library == 'cobra'
    assert RunConfig.from_namespace(opts).atlas_library == 'cobra'
    suit = parse_args([str(bids), str(tmp_path / 'out'), 'participant', '--atlas-library', 'suit'])
    assert RunConfig.from_namespace(suit).atlas_library == 'suit'
    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant', '--fusion-search', '1',
                       '--fusion-nonlocal-weight', '0.25'])
    assert opts.fusion_search == '1' and float(opts.fusion_nonlocal_weight) == 0.25


@pytest.mark.parametrize('argv,library,search,weight,white', [
    ([], 'cobra', 1, 0.5, [13, 26]),      # auto: local and non-local voting mixed, levels matched
    ([], 'suit', 0, 1.0, []),
    (['--fusion-search', '1'], 'cobra', 1, 1.0, [13, 26]),   # a number: non-local only
    (['--fusion-search', '0'], 'cobra', 0, 1.0, [13, 26]),
    (['--fusion-search', '1'], 'suit', 1, 1.0, []),
    (['--fusion-nonlocal-weight', '0.25'], 'cobra', 1, 0.25, [13, 26]),
    (['--fusion-search', '2', '--fusion-nonlocal-weight', '0.5'], 'suit', 2, 0.5, []),
])
def test_fusion_follows_the_protocol_unless_asked(bids, tmp_path, argv, library, search,
                                                  weight, white):
    from cerebseg.bids_app.config import RunConfig
    from cerebseg.bids_app.metadata import dseg_meta, fusion_settings

    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant', *argv])
    cfg = RunConfig.from_namespace(opts)
    assert fusion_settings(cfg, {'name': library}) == {
        'search': search, 'nonlocal_weight': weight, 'white_labels': white}
    assert RunConfig.from_toml(cfg.to_toml()) == cfg
    from types import SimpleNamespace   # the sidecar says which fusion ran

    run = SimpleNamespace(t1w=str(bids / 'sub-01/anat/sub-01_T1w.nii.gz'), t2w=None)
    method = dseg_meta(run, {'name': library, 'citation': 'c', 'licence': 'l',
                             'entry_info': [{'name': 'e'}]}, bids, cfg)['Method']
    kind = 'locally' if not search else 'non-local' if weight == 1.0 else 'mixed'
    assert method['Name'].startswith(f'multi-atlas registration and {kind}')
    assert ('grey-matter and white-matter labels' in method['Fusion']) is bool(white)
    assert (f'{1 - weight:g} times those of local voting' in method['Fusion']) is (kind == 'mixed')


@pytest.mark.parametrize('argv,library,mode', [
    ([], 'cobra', 'tissue'),        # auto: the CERES maps label tissue only
    ([], 'suit', 'fused'),          # auto: the SUIT atlas labels its partial-volume shell
    (['--outline', 'fused'], 'cobra', 'fused'),
    (['--outline', 'trimmed'], 'suit', 'trimmed'),
    (['--outline', 'trimmed'], 'cobra', 'trimmed'),
    (['--outline', 'tissue'], 'suit', 'tissue'),
])
def test_outline_follows_the_protocol_unless_asked(bids, tmp_path, argv, library, mode):
    from cerebseg.bids_app.config import RunConfig
    from cerebseg.bids_app.metadata import outline_mode

    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant', *argv])
    cfg = RunConfig.from_namespace(opts)
    assert outline_mode(cfg, {'name': library}) == mode


@pytest.mark.parametrize('argv,library,moved', [
    ([], 'cobra', True),            # auto: the protocol's choice
    ([], 'suit', False),
    (['--lobule-borders', 'branches'], 'cobra', True),
    (['--lobule-borders', 'fused'], 'cobra', False),
])
def test_lobule_borders_follow_the_protocol_unless_asked(bids, tmp_path, argv, library, moved):
    from cerebseg.bids_app.config import RunConfig
    from cerebseg.bids_app.metadata import lobule_branches

    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant', *argv])
    branches = lobule_branches(RunConfig.from_namespace(opts), {'name': library})
    assert (branches is not None) is moved
    if moved:   # background first, then the 26 CERES labels; the corpus medullare is unit 0
        assert len(branches['units']) == len(branches['sides']) == 27
        assert branches['units'][13] == branches['units'][26] == 0
        assert branches['units'][1:4] == [1, 1, 1] and set(branches['sides'][1:14]) == {1}
    # the library's lobule votes (assets that have them) travel with the branches
    votes = {'entries': [], 'names': ['x'], 'weight': 0.5, 'n_labels': 11, 'protocol': 'suit'}
    with_votes = lobule_branches(RunConfig.from_namespace(opts),
                                 {'name': library, 'votes': votes})
    assert (with_votes or {}).get('votes') == (votes if moved else None)
    off = parse_args([str(bids), str(tmp_path / 'out'), 'participant', *argv,
                      '--lobule-votes', 'off'])
    assert 'votes' not in (lobule_branches(RunConfig.from_namespace(off),
                                           {'name': library, 'votes': votes}) or {})
    if moved:   # asked for votes the library does not have
        on = parse_args([str(bids), str(tmp_path / 'out'), 'participant', *argv,
                         '--lobule-votes', 'on'])
        with pytest.raises(ValueError, match='--lobule-votes off'):
            lobule_branches(RunConfig.from_namespace(on), {'name': library})


def test_branches_need_a_protocol_that_labels_the_corpus_medullare(bids, tmp_path):
    from cerebseg.bids_app.config import RunConfig
    from cerebseg.bids_app.metadata import lobule_branches

    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant',
                       '--lobule-borders', 'branches'])
    with pytest.raises(ValueError, match='--atlas-library cobra or --lobule-borders fused'):
        lobule_branches(RunConfig.from_namespace(opts), {'name': 'suit'})


def test_registration_control_grid_follows_the_protocol():
    from cerebseg.assets import registration_control_mm

    assert registration_control_mm({'name': 'cobra'}) == 2.0
    assert registration_control_mm({'name': 'suit'}) == 4.0
    assert registration_control_mm({'name': 'no-such-protocol'}) == 4.0


@pytest.mark.parametrize('args', [
    ['{bids}', '{bids}', 'participant'],
    ['{bids}', '{bids}/out', 'participant'],
    ['{tmp}/missing', '{tmp}/out', 'participant'],
    ['{bids}', '{tmp}/out', 'everything'],
    ['{bids}', '{tmp}/out', 'participant', '--nprocs', '0'],
    ['{bids}', '{tmp}/out', 'participant', '--nprocs', '1', '--omp-nthreads', '2'],
    ['{bids}', '{tmp}/out', 'participant', '--device', 'tpu'],
    ['{bids}', '{tmp}/out', 'participant', '--fusion-search', '3'],
    ['{bids}', '{tmp}/out', 'participant', '--fusion-nonlocal-weight', '1.5'],
    ['{bids}', '{tmp}/out', 'participant', '--fusion-nonlocal-weight', 'half'],
    ['{bids}', '{tmp}/out', 'participant', '--outline', 'tight'],
    ['{bids}', '{tmp}/out', 'participant', '--bids-filter-file', '{tmp}/nofile.json'],
])
def test_usage_errors_exit_2(bids, tmp_path, args, capsys):
    argv = [a.format(bids=bids, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert err.value.code == 2


def test_output_under_derivatives_is_allowed(bids):
    opts = parse_args([str(bids), str(bids / 'derivatives' / 'cerebseg'), 'participant'])
    assert opts.output_dir == bids / 'derivatives' / 'cerebseg'


def test_version(capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(['--version'])
    assert err.value.code == 0
    assert 'cerebseg' in capsys.readouterr().out


def test_config_toml_roundtrip(bids, tmp_path):
    from cerebseg.bids_app.config import RunConfig

    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant',
                       '--participant-label', '01', '--random-seed', '7'])
    cfg = RunConfig.from_namespace(opts)
    again = RunConfig.from_toml(cfg.to_toml())
    assert again == cfg and again.random_seed == 7 and again.participant_label == ('01',)


def test_plugin_and_plugin_args(bids, tmp_path, capsys):
    import json

    from cerebseg.bids_app.config import RunConfig
    from cerebseg.bids_app.execution import execution_settings, plugin_settings

    base = [str(bids), str(tmp_path / 'out'), 'participant', '--nprocs', '2']
    opts = parse_args(base)
    cfg = RunConfig.from_namespace(opts)
    assert plugin_settings(cfg)[0] == 'MultiProc'
    assert plugin_settings(cfg)[1] == {'n_procs': 2, 'raise_insufficient': False,
                                       'mp_context': 'spawn'}
    # the MultiProc scheduler looks at its workers often (a participant is a chain of short
    # nodes); a batch queue is asked at Nipype's pace
    assert execution_settings(cfg, 'MultiProc')['poll_sleep_duration'] <= 0.5
    assert 'poll_sleep_duration' not in execution_settings(cfg, 'SLURM')
    assert execution_settings(cfg, 'Linear')['crashfile_format'] == 'txt'
    opts = parse_args(base + ['--plugin', 'SLURM', '--plugin-args',
                              '{"sbatch_args": "--time=1:00:00", "max_jobs": 4}'])
    plugin, args = plugin_settings(RunConfig.from_namespace(opts), progress=print)
    assert plugin == 'SLURM' and args == {'sbatch_args': '--time=1:00:00', 'max_jobs': 4,
                                          'status_callback': print}
    yml = tmp_path / 'plugin.yml'
    yml.write_text('sbatch_args: --partition=short\n')
    js = tmp_path / 'plugin.json'
    js.write_text(json.dumps({'sbatch_args': '--mem=8G'}))
    for path, want in ((yml, '--partition=short'), (js, '--mem=8G')):
        opts = parse_args(base + ['--plugin', 'SLURMGraph', '--plugin-args', str(path)])
        plugin, args = plugin_settings(RunConfig.from_namespace(opts), progress=print)
        assert plugin == 'SLURMGraph' and args == {'sbatch_args': want,
                                                   'status_callback': print}
    for bad in ('{"a": ', '[1, 2]', str(tmp_path / 'missing.json')):
        with pytest.raises(SystemExit) as info:
            parse_args(base + ['--plugin-args', bad])
        assert info.value.code == 2
    assert '--plugin-args' in capsys.readouterr().err


@pytest.mark.parametrize('choice', ['auto', 'off'])
def test_sidecar_names_the_lobule_votes_only_when_they_vote(bids, tmp_path, choice):
    """``AtlasLibrary.LobuleVotes`` and ``Method.LobuleBorders`` say what ran: the votes'
    entries with ``auto``, nothing about them with ``--lobule-votes off`` although the library
    has them."""
    from types import SimpleNamespace

    from cerebseg.bids_app.config import RunConfig
    from cerebseg.bids_app.metadata import dseg_meta

    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant',
                       '--atlas-library', 'cobra', '--lobule-votes', choice])
    votes = {'entries': [], 'names': ['suit-A', 'suit-AMirror'], 'weight': 0.5, 'n_labels': 11,
             'protocol': 'suit'}
    library = {'name': 'cobra', 'citation': 'c', 'licence': 'l', 'entry_info': [{'name': 'e'}],
               'votes': votes}
    run = SimpleNamespace(t1w=str(bids / 'sub-01/anat/sub-01_T1w.nii.gz'), t2w=None)
    meta = dseg_meta(run, library, bids, RunConfig.from_namespace(opts))
    voted = choice == 'auto'
    assert ('LobuleVotes' in meta['AtlasLibrary']) is voted
    assert ('suit-A, suit-AMirror' in meta['Method']['LobuleBorders']) is voted
    assert 'white-matter branch' in meta['Method']['LobuleBorders']


@pytest.mark.parametrize('choice', ['symmetric', 'single', 'coarse'])
def test_sidecars_say_how_the_affine_was_fitted(bids, tmp_path, choice):
    """``--affine-fit``: the config carries it, and both sidecars' ``Method.Preprocessing`` say
    whether the T1w's mirror was fitted too."""
    from types import SimpleNamespace

    from cerebseg.bids_app.config import RunConfig
    from cerebseg.bids_app.metadata import affine_text, dseg_meta

    cfg = RunConfig.from_namespace(parse_args([str(bids), str(tmp_path / 'out'), 'participant',
                                               '--affine-fit', choice]))
    assert cfg.affine_fit == choice
    library = {'name': 'suit', 'citation': 'c', 'licence': 'l', 'entry_info': [{'name': 'e'}]}
    run = SimpleNamespace(t1w=str(bids / 'sub-01/anat/sub-01_T1w.nii.gz'), t2w=None)
    text = dseg_meta(run, library, bids, cfg)['Method']['Preprocessing']
    assert affine_text(cfg) in text
    assert ('mirror-equivariant' in text) is (choice == 'symmetric')
    assert ('not for volumes' in text) is (choice == 'coarse')
    default = RunConfig.from_namespace(parse_args([str(bids), str(tmp_path / 'o'), 'participant']))
    assert default.affine_fit == 'symmetric'
