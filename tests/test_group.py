"""The group level on a synthetic output tree: statistics, tables, QC list, report, CLI."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cerebseg.bids_app.group import read_statuses, write_group_outputs
from cerebseg.bids_app.group_data import run_ids
from cerebseg.errors import UsageError
from cerebseg.utils.group_stats import (MAD_TO_SD, MIN_OUTLIER_N, OUTLIER_Z, asymmetry_index,
                                        outliers, pair_structures, robust_z)

CEREBELLUM = (('1', 'Left_I_IV', 3000.0), ('2', 'Right_I_IV', 2900.0), ('3', 'Vermis_VI', 1700.0),
              ('4', 'Left_Dentate', 1600.0), ('5', 'Right_Dentate', 1650.0))
BRAINSTEM = (('1', 'Midbrain_GM', 6000.0), ('2', 'Left_RN', 400.0), ('3', 'Right_RN', 380.0),
             ('n/a', 'Midbrain', 6780.0))
ICV = 1.5e6
GROUPS = {'01': 'control', '02': 'depr', '03': 'control', '04': 'depr', '05': 'control',
          '07': 'depr', '08': 'control'}   # sub-06 is not in participants.tsv


def _morph(path: Path, rows, scale: float, icv: float = ICV) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ['index\tname\tvolume_mm3\tvolume_icv_fraction']
    for index, name, vol in rows:
        vol = vol * scale(name) if callable(scale) else vol * scale
        lines.append(f'{index}\t{name}\t{vol:.1f}\t{vol / icv:.6e}')
    path.write_text('\n'.join(lines) + '\n')


def _status(out: Path, label: str, code: int, finished: str, uuid: str, flags=()) -> None:
    sub = label.split('_')[0]
    path = out / sub / 'log' / uuid / f'{label}_status.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        'label': label, 'subject': sub[4:], 'session': None, 'exit_code': code,
        'message': 'done' if code == 0 else 'T1w\tunreadable:\nheader truncated',
        'started': finished, 'finished': finished, 'elapsed_s': 1.0, 'device': 'cpu',
        'version': '0.1.0', 'run_uuid': uuid, 'qc_flags': list(flags)}))


def add_participant(out: Path, sub: str, scale=1.0, session: str | None = None) -> None:
    label = f'sub-{sub}_ses-{session}' if session else f'sub-{sub}'
    anat = out / f'sub-{sub}' / (f'ses-{session}/anat' if session else 'anat')
    _morph(anat / f'{label}_seg-cerebellum_morph.tsv', CEREBELLUM, scale)
    _morph(anat / f'{label}_seg-brainstem_morph.tsv', BRAINSTEM, 1.0)


@pytest.fixture
def tree(tmp_path):
    """bids/ with participants.tsv (+ .json) and out/ with 6 participants' volumes (sub-03 has a
    huge Left_I_IV, sub-02 two sessions), a failed sub-07 and a flagged sub-04."""
    bids, out = tmp_path / 'bids', tmp_path / 'out'
    bids.mkdir()
    (bids / 'dataset_description.json').write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    (bids / 'participants.tsv').write_text('participant_id\tage\tgroup\n' + ''.join(
        f'sub-{s}\t{20 + int(s)}\t{g}\n' for s, g in GROUPS.items()))
    (bids / 'participants.json').write_text(json.dumps(
        {'age': {'Description': 'Age', 'Units': 'year'}}))
    out.mkdir()
    (out / 'dataset_description.json').write_text(json.dumps(
        {'Name': 'cerebseg output', 'GeneratedBy': [{'Name': 'cerebseg', 'Version': '0.1.0'}]}))
    for i, sub in enumerate(('01', '03', '04', '05', '06')):
        big = sub == '03'
        add_participant(out, sub, lambda name, i=i, big=big:
                        (3.0 if big and name == 'Left_I_IV' else 1.0) * (1 + 0.01 * i))
    add_participant(out, '02', 1.02, session='a')
    add_participant(out, '02', 1.03, session='b')
    _status(out, 'sub-01', 0, '2026-01-01T10:00:00Z', 'u1')
    _status(out, 'sub-04', 70, '2026-01-01T09:00:00Z', 'u0')   # older failure, then fine
    _status(out, 'sub-04', 0, '2026-01-02T09:00:00+00:00', 'u2', flags=[
        {'kind': 'low_fit', 'structure': 'Left_Dentate', 'message': 'template fit r = 0.2'}])
    _status(out, 'sub-07', 65, '2026-01-02T10:00:00Z', 'u3')  # failed: no morph table
    return bids, out


def _read(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split('\t')
    return [dict(zip(header, line.split('\t'))) for line in lines[1:]]


def test_robust_z():
    z = robust_z([1.0, 2.0, 3.0, 4.0, 100.0])      # median 3, MAD 1
    np.testing.assert_allclose(z, (np.array([1, 2, 3, 4, 100]) - 3) / MAD_TO_SD)
    z = robust_z([1.0, np.nan, 3.0, 2.0, np.inf])  # NaN and inf ignored, NaN z
    np.testing.assert_allclose(z[[0, 2, 3]], [-1 / MAD_TO_SD, 1 / MAD_TO_SD, 0])
    assert np.isnan(z[[1, 4]]).all()
    x = np.array([5.0, 5.0, 5.0, 5.0, 9.0])        # MAD 0: the SD instead
    np.testing.assert_allclose(robust_z(x), (x - 5) / x.std(ddof=1))
    assert robust_z([2.0, 2.0, 2.0]).tolist() == [0, 0, 0]   # no spread at all
    assert robust_z([7.0]).tolist() == [0]
    cols = robust_z(np.array([[1.0, np.nan], [2.0, np.nan], [3.0, np.nan]]))  # per column
    np.testing.assert_allclose(cols[:, 0], [-1 / MAD_TO_SD, 0, 1 / MAD_TO_SD])
    assert np.isnan(cols[:, 1]).all()


def test_outliers_asymmetry_and_pairs():
    assert OUTLIER_Z == 3.5
    assert outliers([0.0, 3.6, -4.0, np.nan, 3.5]).tolist() == [False, True, True, False, False]
    assert outliers([2.1], threshold=2).tolist() == [True]
    z = np.array([[9.0, 9.0], [0.0, np.nan], [0.0, np.nan]])
    assert outliers(z, min_n=3).tolist() == [[True, False], [False, False], [False, False]]
    np.testing.assert_allclose(asymmetry_index([110.0, 90.0], [90.0, 110.0]), [0.2, -0.2])
    assert np.isnan(asymmetry_index([0.0, np.nan], [0.0, 1.0])).all()
    names = ['Left_I_IV', 'Right_I_IV', 'Vermis_VI', 'Left_Dentate', 'Midbrain_GM', 'Left_RN',
             'Right_RN', 'Right_Dentate', 'Left_Only', 'Right_Other', 'Left_']
    assert pair_structures(names) == [('I_IV', 'Left_I_IV', 'Right_I_IV'),
                                      ('Dentate', 'Left_Dentate', 'Right_Dentate'),
                                      ('RN', 'Left_RN', 'Right_RN')]
    assert run_ids('sub-01_ses-a_run-2') == ('sub-01', 'ses-a', '2')
    assert run_ids('sub-01') == ('sub-01', 'n/a', 'n/a')


def test_group_table(tree):
    bids, out = tree
    written = write_group_outputs(out, bids)
    names = {p.relative_to(out).as_posix() for p in written}
    assert {'group_seg-cerebellum_morph.tsv', 'group_seg-cerebellum_morph.json',
            'group_seg-brainstem_morph.tsv', 'group_seg-brainstem_morph.json', 'group_qc.tsv',
            'group_report.html', 'figures/group_seg-cerebellum_volumes.svg',
            'figures/group_seg-cerebellum_asymmetry.svg'} <= names
    header = (out / 'group_seg-cerebellum_morph.tsv').read_text().splitlines()[0].split('\t')
    struct = [n for _, n, _ in CEREBELLUM]
    assert header == (['participant_id', 'session_id', 'run'] + struct
                      + [f'{n}_icv' for n in struct] + ['total_mm3', 'total_icv', 'age', 'group']
                      + [f'{n}_z' for n in struct] + ['n_outliers', 'outlier_structures'])
    rows = {(r['participant_id'], r['session_id']): r
            for r in _read(out / 'group_seg-cerebellum_morph.tsv')}
    assert len(rows) == 7 and ('sub-02', 'ses-b') in rows and ('sub-07', 'n/a') not in rows
    r1 = rows['sub-01', 'n/a']
    assert r1['run'] == 'n/a' and r1['Left_I_IV'] == '3000.0'
    assert float(r1['Left_I_IV_icv']) == pytest.approx(3000 / ICV)
    assert float(r1['total_mm3']) == pytest.approx(sum(v for _, _, v in CEREBELLUM))
    assert (r1['age'], r1['group']) == ('21', 'control')
    assert (rows['sub-06', 'n/a']['age'], rows['sub-06', 'n/a']['group']) == ('n/a', 'n/a')
    assert rows['sub-03', 'n/a']['n_outliers'] == '1'
    assert rows['sub-03', 'n/a']['outlier_structures'] == 'Left_I_IV'
    assert float(rows['sub-03', 'n/a']['Left_I_IV_z']) > OUTLIER_Z
    for key, row in rows.items():
        if key != ('sub-03', 'n/a'):
            assert row['outlier_structures'] == 'n/a' and row['n_outliers'] == '0', key
            assert abs(float(row['Left_Dentate_z'])) < OUTLIER_Z
    meta = json.loads((out / 'group_seg-cerebellum_morph.json').read_text())
    assert list(meta) == header
    assert meta['Left_I_IV']['Units'] == 'mm^3' and 'Units' not in meta['Left_I_IV_icv']
    assert meta['age'] == {'Description': 'Age', 'Units': 'year'}   # from participants.json
    assert all(m['Description'] for m in meta.values())
    # the brainstem's part sums (index n/a) are columns but not counted again in the total
    bs = _read(out / 'group_seg-brainstem_morph.tsv')[0]
    assert bs['Midbrain'] == '6780.0' and float(bs['total_mm3']) == pytest.approx(6780.0)


def test_group_qc(tree):
    bids, out = tree
    write_group_outputs(out, bids)
    lines = (out / 'group_qc.tsv').read_text().splitlines()
    assert lines[0] == 'participant_id\tsession_id\trun\tstatus\treasons\treport'
    qc = {r['participant_id']: r for r in _read(out / 'group_qc.tsv')}
    assert set(qc) == {'sub-03', 'sub-04', 'sub-07'}
    assert qc['sub-07']['status'] == 'failed' and qc['sub-07']['report'] == 'sub-07.html'
    assert 'exit code 65: T1w unreadable: header truncated' in qc['sub-07']['reasons']
    assert 'no volume table' in qc['sub-07']['reasons']
    assert qc['sub-04']['status'] == 'flagged'  # the newest status (by finished) counts
    assert 'low_fit (Left_Dentate): template fit r = 0.2' == qc['sub-04']['reasons']
    assert qc['sub-03']['status'] == 'flagged' and 'Left_I_IV' in qc['sub-03']['reasons']
    assert read_statuses(out)['sub-04']['run_uuid'] == 'u2'


def test_report(tree):
    bids, out = tree
    write_group_outputs(out, bids, group_by='group')
    page = (out / 'group_report.html').read_text()
    for sub in ('01', '02', '03', '04', '05', '06', '07'):
        assert f'href="sub-{sub}.html"' in page, sub
    assert page.count('<svg') == 4 and '<?xml' not in page and '<!DOCTYPE svg' not in page
    # every point of the inline plots is a link to its participant's report, with a tooltip
    points = re.findall(r'<a xlink:href="(sub-\d+)\.html"><title>([^<]*)</title>', page)
    assert {p for p, _ in points} == {f'sub-0{i}' for i in range(1, 7)}
    assert any('sub-03: Left_I_IV' in t for _, t in points)
    assert 'control' in page and 'depr' in page and 'group = control' in page
    assert '<script' not in page and not re.search(r'(src|href)="(https?:)?//', page)
    ids = re.findall(r' id="([^"]+)"', page)
    assert len(ids) == len(set(ids)), 'ids are unique in the page'
    svg = (out / 'figures/group_seg-cerebellum_volumes.svg').read_text()
    assert svg.startswith('<?xml') and 'xlink:href="../sub-03.html"' in svg
    assert 'Software' in page and 'cerebseg 0.1.0' in page


def test_report_in_chromium(tree, tmp_path):
    from browser import check_page

    bids, out = tree
    write_group_outputs(out, bids, group_by='group')
    result = check_page(out / 'group_report.html', screenshot=tmp_path / 'group.png')
    assert result['console'] == [], result['console']
    assert result['svgs'] >= 4 and all(i['ok'] for i in result['images'])
    assert {f'sub-0{i}.html' for i in range(1, 8)} <= set(result['links'])
    assert (tmp_path / 'group.png').stat().st_size > 10_000


def test_usage_errors(tree, tmp_path):
    bids, out = tree
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(UsageError, match='run the participant level first'):
        write_group_outputs(empty, bids)
    with pytest.raises(UsageError, match=r"--group-by diagnosis.*age, group"):
        write_group_outputs(out, bids, group_by='diagnosis')
    (bids / 'participants.tsv').unlink()
    with pytest.raises(UsageError, match='diagnosis'):
        write_group_outputs(out, bids, group_by='diagnosis')
    write_group_outputs(out, bids)  # without participants.tsv nothing is joined
    header = (out / 'group_seg-cerebellum_morph.tsv').read_text().splitlines()[0]
    assert '\tage\t' not in header and '\ttotal_icv\tLeft_I_IV_z\t' in header


def test_rerun_updates_everything(tree):
    bids, out = tree
    write_group_outputs(out, bids)
    assert 'sub-08' not in (out / 'group_seg-cerebellum_morph.tsv').read_text()
    add_participant(out, '08', 0.99)
    _morph(out / 'sub-07/anat/sub-07_seg-cerebellum_morph.tsv', CEREBELLUM, 1.0)
    _status(out, 'sub-07', 0, '2026-01-03T10:00:00Z', 'u4')   # sub-07 re-run and fine now
    write_group_outputs(out, bids)
    rows = _read(out / 'group_seg-cerebellum_morph.tsv')
    assert [r['participant_id'] for r in rows].count('sub-08') == 1 and len(rows) == 9
    assert {r['participant_id'] for r in _read(out / 'group_qc.tsv')} == {'sub-03', 'sub-04'}
    assert 'sub-08.html' in (out / 'group_report.html').read_text()


def test_cli_group_level(tree, caplog):
    from cerebseg.bids_app.parser import parse_args
    from cerebseg.bids_app.run import main

    bids, out = tree
    assert main([str(bids), str(out), 'group', '--group-by', 'group']) == 0
    assert 'Group output written' in caplog.text
    assert (out / 'group_report.html').is_file()
    assert main([str(bids), str(out), 'group', '--group_by', 'nope']) == 2
    assert 'nope' in caplog.text and 'age, group' in caplog.text
    with pytest.raises(SystemExit) as err:
        parse_args([str(bids), str(out), 'participant', '--group-by', 'group'])
    assert err.value.code == 2


def test_report_without_matplotlib(tree, monkeypatch, caplog):
    """matplotlib is optional: the tables and the report are written, without figures."""
    import sys

    bids, out = tree
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    written = write_group_outputs(out, bids)
    assert not any(p.suffix == '.svg' for p in written)
    page = (out / 'group_report.html').read_text()
    assert 'matplotlib is not installed' in page and '<svg' not in page
    assert 'href="sub-03.html"' in page and 'matplotlib' in caplog.text


def test_few_runs_flag_no_outlier(tmp_path):
    """With fewer than MIN_OUTLIER_N runs the z-scores are written but nothing is flagged."""
    assert MIN_OUTLIER_N > 3
    out = tmp_path / 'out'
    for i, sub in enumerate(('01', '02', '03')):
        add_participant(out, sub, 5.0 if sub == '03' else 1.0 + 0.01 * i)
    write_group_outputs(out, tmp_path)
    rows = _read(out / 'group_seg-cerebellum_morph.tsv')
    assert all(r['n_outliers'] == '0' for r in rows) and rows[-1]['Left_I_IV_z'] != 'n/a'
    assert len(_read(out / 'group_qc.tsv')) == 0
    assert 'fewer than' in (out / 'group_report.html').read_text()


def test_labels_not_measured_stay_not_measured(tree):
    """A run whose image cut off a label (its volume n/a in the morph table): the group table
    writes n/a for that label, its ICV fraction, its z-score and the run's total, never a
    smaller total; the other runs' statistics are unchanged; the report is still written."""
    bids, out = tree
    write_group_outputs(out, bids)
    before = {r['participant_id']: r for r in _read(out / 'group_seg-cerebellum_morph.tsv')
              if r['session_id'] == 'n/a'}
    path = out / 'sub-05' / 'anat' / 'sub-05_seg-cerebellum_morph.tsv'
    lines = path.read_text().splitlines()
    cut = [i for i, line in enumerate(lines) if '\tVermis_VI\t' in line][0]
    lines[cut] = '3\tVermis_VI\tn/a\tn/a'
    path.write_text('\n'.join(lines) + '\n')
    write_group_outputs(out, bids)
    rows = {r['participant_id']: r for r in _read(out / 'group_seg-cerebellum_morph.tsv')
            if r['session_id'] == 'n/a'}
    r5 = rows['sub-05']
    assert (r5['Vermis_VI'], r5['Vermis_VI_icv'], r5['Vermis_VI_z']) == ('n/a', 'n/a', 'n/a')
    assert (r5['total_mm3'], r5['total_icv']) == ('n/a', 'n/a')
    assert r5['Left_I_IV'] == before['sub-05']['Left_I_IV']
    assert rows['sub-01']['total_mm3'] == before['sub-01']['total_mm3']
    assert (out / 'group_report.html').is_file()
