"""Command-line parsing (exit code 2 on usage errors)."""
import pytest

from cerebseg.bids_app.parser import parse_args
from conftest import make_bids


@pytest.fixture
def bids(tmp_path):
    return make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz']})


def test_defaults_and_label_prefix(bids, tmp_path):
    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant',
                       '--participant_label', 'sub-01', '02', '--nprocs', '2'])
    assert opts.participant_label == ['01', '02']
    assert opts.nprocs == 2 and opts.omp_nthreads == 2
    opts = parse_args([str(bids), str(tmp_path / 'out'), 'participant',
                       '--participant-label', '01', '--session-label', 'ses-a'])
    assert opts.participant_label == ['01'] and opts.session_label == ['a']


@pytest.mark.parametrize('args', [
    ['{bids}', '{bids}', 'participant'],
    ['{bids}', '{bids}/out', 'participant'],
    ['{tmp}/missing', '{tmp}/out', 'participant'],
    ['{bids}', '{tmp}/out', 'everything'],
    ['{bids}', '{tmp}/out', 'participant', '--nprocs', '0'],
    ['{bids}', '{tmp}/out', 'participant', '--nprocs', '1', '--omp-nthreads', '2'],
    ['{bids}', '{tmp}/out', 'participant', '--device', 'tpu'],
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
