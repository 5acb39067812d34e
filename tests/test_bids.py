"""Input collection on synthetic BIDS trees and derivative naming."""
import json

import pytest

from cerebseg.bids_app.bids import collect_inputs, load_filters
from cerebseg.bids_app.group import write_group_outputs
from cerebseg.errors import BadDataError, UsageError
from cerebseg.interfaces.bids import derivative_path, source_entities
from conftest import make_bids


def test_t1w_only_and_t1w_t2w(tmp_path):
    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz', 'anat/sub-01_T2w.nii.gz'],
                                       '02': ['anat/sub-02_T1w.nii.gz']})
    runs = collect_inputs(root)
    assert [(r.subject, bool(r.t2w)) for r in runs] == [('01', True), ('02', False)]
    runs = collect_inputs(root, t1_only=True)
    assert all(r.t2w is None for r in runs)
    assert collect_inputs(root, participant_label=['02'])[0].subject == '02'


def test_sessions_runs_and_pairing(tmp_path):
    root = make_bids(tmp_path / 'ds', {'01': [
        'ses-a/anat/sub-01_ses-a_run-1_T1w.nii.gz', 'ses-a/anat/sub-01_ses-a_run-2_T1w.nii.gz',
        'ses-a/anat/sub-01_ses-a_run-1_T2w.nii.gz', 'ses-a/anat/sub-01_ses-a_run-2_T2w.nii.gz',
        'ses-b/anat/sub-01_ses-b_T1w.nii.gz']})
    runs = collect_inputs(root)
    assert len(runs) == 3
    by_label = {r.label: r for r in runs}
    assert by_label['sub-01_ses-a_run-1'].t2w.endswith('sub-01_ses-a_run-1_T2w.nii.gz')
    assert by_label['sub-01_ses-a_run-2'].t2w.endswith('sub-01_ses-a_run-2_T2w.nii.gz')
    assert by_label['sub-01_ses-b'].t2w is None  # never paired across sessions
    assert len(collect_inputs(root, session_label=['b'])) == 1


def test_ambiguous_t2w_is_bad_data(tmp_path):
    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T1w.nii.gz',
                                              'anat/sub-01_acq-a_T2w.nii.gz',
                                              'anat/sub-01_acq-b_T2w.nii.gz']})
    with pytest.raises(BadDataError, match='several T2w'):
        collect_inputs(root)
    filt = tmp_path / 'filter.json'
    filt.write_text(json.dumps({'t2w': {'acquisition': 'a'}}))
    runs = collect_inputs(root, filters=load_filters(filt))
    assert runs[0].t2w.endswith('acq-a_T2w.nii.gz')


def test_errors(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(BadDataError, match='dataset_description.json'):
        collect_inputs(empty)
    root = make_bids(tmp_path / 'ds', {'01': ['anat/sub-01_T2w.nii.gz'],
                                       '02': ['anat/sub-02_T1w.nii.gz']})
    with pytest.raises(UsageError, match=r"\['03'\]"):
        collect_inputs(root, participant_label=['03'])
    with pytest.raises(BadDataError, match='No T1w image for sub-01'):
        collect_inputs(root, participant_label=['01'])
    bad = tmp_path / 'bad.json'
    bad.write_text('{"t1w": ')
    with pytest.raises(UsageError, match='not valid JSON'):
        load_filters(bad)
    bad.write_text('{"flair": {}}')
    with pytest.raises(UsageError, match='may only have'):
        load_filters(bad)


def test_derivative_names(tmp_path):
    src = '/data/sub-01/ses-a/anat/sub-01_ses-a_acq-mp2_run-2_T1w.nii.gz'
    assert source_entities(src) == {'sub': '01', 'ses': 'a', 'acq': 'mp2', 'run': '2'}
    path = derivative_path(tmp_path, src, 'dseg', '.nii.gz', space='MNI152NLin2009cAsym',
                           res='05', seg='cerebellum')
    assert path == tmp_path / 'sub-01/ses-a/anat/' \
        'sub-01_ses-a_acq-mp2_run-2_space-MNI152NLin2009cAsym_seg-cerebellum_res-05_dseg.nii.gz'
    xfm = derivative_path(tmp_path, src, 'xfm', '.mat', to='MNI152NLin2009cAsym', mode='image',
                          **{'from': 'T1w'})
    assert xfm.name == 'sub-01_ses-a_acq-mp2_run-2_from-T1w_to-MNI152NLin2009cAsym_' \
                       'mode-image_xfm.mat'
    with pytest.raises(ValueError):
        derivative_path(tmp_path, src, 'dseg', '.nii.gz', atlas='x')


def test_group_table(tmp_path):
    """The group tables of the structures with participant results (details: test_group.py)."""
    with pytest.raises(UsageError, match='participant level first'):
        write_group_outputs(tmp_path, tmp_path)
    for sub, vol in (('01', 10.0), ('02', 20.0)):
        p = tmp_path / f'sub-{sub}/anat/sub-{sub}_seg-cerebellum_morph.tsv'
        p.parent.mkdir(parents=True)
        p.write_text('index\tname\tvolume_mm3\tvolume_icv_fraction\n'
                     f'1\tLeft_I_IV\t{vol}\t0.1\n2\tRight_I_IV\t{vol * 2}\t0.2\n')
    written = [p.name for p in write_group_outputs(tmp_path, tmp_path)]
    assert 'group_seg-cerebellum_morph.tsv' in written
    assert 'group_seg-brainstem_morph.tsv' not in written
    table = (tmp_path / 'group_seg-cerebellum_morph.tsv').read_text().splitlines()
    assert table[0].split('\t') == [
        'participant_id', 'session_id', 'run', 'Left_I_IV', 'Right_I_IV', 'Left_I_IV_icv',
        'Right_I_IV_icv', 'total_mm3', 'total_icv', 'Left_I_IV_z', 'Right_I_IV_z', 'n_outliers',
        'outlier_structures']
    assert table[2].startswith('sub-02\tn/a\tn/a\t20.0\t40.0\t0.1\t0.2\t60.0\t')
    bs = tmp_path / 'sub-01/anat/sub-01_seg-brainstem_morph.tsv'
    bs.write_text('index\tname\tvolume_mm3\tvolume_icv_fraction\n1\tPons_GM\t7.5\t0.1\n'
                  'n/a\tWhole_Brainstem\t7.5\t0.1\n')
    written = [p.name for p in write_group_outputs(tmp_path, tmp_path)]
    assert {'group_seg-cerebellum_morph.tsv', 'group_seg-brainstem_morph.tsv'} <= set(written)
    rows = (tmp_path / 'group_seg-brainstem_morph.tsv').read_text().splitlines()
    assert rows[0].split('\t')[:5] == ['participant_id', 'session_id', 'run', 'Pons_GM',
                                       'Whole_Brainstem']
    assert rows[1].startswith('sub-01\tn/a\tn/a\t7.5\t7.5\t0.1\t0.1\t7.5\t')
