"""Report figures, QC flags, the participant report and the BIDS conformance helpers."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from browser import check_page
from cerebseg.assets.reference import participant_means, reference_ranges
from cerebseg.bids_app.bids import BIDSIGNORE, write_bidsignore, write_descriptions, write_lut
from cerebseg.bids_app.reports import (latest_status, participant_flags,
                                       write_participant_report, write_status)
from cerebseg.interfaces.bids import DerivativesDataSink, derivative_path
from cerebseg.utils import qc
from cerebseg.utils.reports import (crop_box, plot_flicker, plot_label_mosaic,
                                    slice_positions)
from cerebseg.workflows.outputs import sidecar_meta
from conftest import make_nifti

LUT = [{'index': '0', 'name': 'background', 'color': '#000000'},
       {'index': '1', 'name': 'Left_A', 'color': '#ff0000'},
       {'index': '2', 'name': 'Right_A', 'color': '#00ff00'}]


def _blob(shape=(30, 32, 28)):
    grid = np.indices(shape).astype(float)
    centre = np.array(shape)[:, None, None, None] / 2
    anat = 100 * np.exp(-((grid - centre) ** 2).sum(0) / 80)
    labels = np.zeros(shape, np.int16)
    labels[8:15, 10:20, 8:20] = 1
    labels[15:22, 10:20, 8:20] = 2
    return anat.astype(np.float32), labels


def test_slices_and_crop():
    mask = np.zeros((20, 20, 20), bool)
    mask[5:16, 2:4, 10] = True
    assert slice_positions(mask, 0, 3, margin=0) == [5, 10, 15]
    assert slice_positions(mask, 2, 1) == [10]
    assert slice_positions(np.zeros((9, 9, 9)), 1, 1) == [4]
    with pytest.raises(ValueError):
        slice_positions(mask, 0, 0)
    box = crop_box(mask, 2)
    assert box == (slice(3, 18), slice(0, 6), slice(8, 13))


def test_label_mosaic_and_flicker(tmp_path):
    anat, labels = _blob()
    out = plot_label_mosaic(anat, labels, (1.0, 1.0, 1.2), LUT, tmp_path / 'm.svg', 'Test')
    svg = out.read_text()
    assert svg.startswith('<?xml') and '<image' in svg and 'Test' in svg
    out = plot_flicker(anat, np.roll(anat, 2, 0), (1, 1, 1), tmp_path / 'f.svg', 'fixed',
                       'moving', 'Check', contour=labels > 0)
    svg = out.read_text()
    assert svg.count('data:image/png;base64,') == 2 and '@keyframes flicker' in svg
    assert 'animation-play-state: paused' in svg
    with pytest.raises(ValueError, match='differ in shape'):
        plot_flicker(anat, anat[1:], (1, 1, 1), tmp_path / 'x.svg', 'a', 'b', 'c')
    with pytest.raises(ValueError, match='differ in shape'):
        plot_label_mosaic(anat, labels[1:], (1, 1, 1), LUT, tmp_path / 'y.svg', 'c')


def test_report_interfaces(tmp_path):
    import ants
    from nipype.pipeline import engine as pe

    from cerebseg.interfaces.reports import LabelMosaicRPT, RegistrationRPT

    anat, labels = _blob()
    t1 = make_nifti(tmp_path / 't1.nii.gz', data=anat)
    dseg = make_nifti(tmp_path / 'dseg.nii.gz', data=labels, dtype=np.int16)
    lut = tmp_path / 'lut.tsv'
    lut.write_text('index\tname\tcolor\n' + ''.join(
        f"{r['index']}\t{r['name']}\t{r['color']}\n" for r in LUT))
    node = pe.Node(LabelMosaicRPT(anat_file=str(t1), dseg_file=str(dseg), lut_file=str(lut),
                                  title='Mosaic'), name='mosaic', base_dir=str(tmp_path))
    assert Path(node.run().outputs.out_report).read_text().count('<image') >= 3
    xfm = str(tmp_path / 'identity.mat')
    ants.write_transform(ants.create_ants_transform(transform_type='AffineTransform',
                                                    dimension=3), xfm)
    node = pe.Node(RegistrationRPT(fixed_file=str(t1), moving_file=str(t1), transform=xfm,
                                   contour_file=str(dseg), fixed_name='a', moving_name='b',
                                   title='Flicker'), name='flicker', base_dir=str(tmp_path))
    assert '@keyframes' in Path(node.run().outputs.out_report).read_text()
    other = make_nifti(tmp_path / 'other.nii.gz', data=labels, dtype=np.int16,
                       zooms=(2.0, 2.0, 2.0))
    bad = pe.Node(LabelMosaicRPT(anat_file=str(t1), dseg_file=str(other), lut_file=str(lut),
                                 title='x'), name='bad', base_dir=str(tmp_path))
    with pytest.raises(Exception, match='not on the grid'):
        bad.run()


def test_qc_flags():
    assert qc.fit_flags({'TemplateFitCorrelation': 0.6, 'T2wToT1wEdgeCorrelation': 0.7}) == []
    kinds = [f['kind'] for f in qc.fit_flags({'TemplateFitCorrelation': 0.3,
                                              'T2wToT1wEdgeCorrelation': 0.2})]
    assert kinds == ['template_fit', 't2w_fit']
    # the T1w's and its mirror's fits averaged (0.8 mm apart): no flag; one kept alone: a flag
    assert qc.fit_flags({'TemplateFitCorrelation': 0.6, 'TemplateFitMirrorDistanceMM': 0.8}) == []
    flags = qc.fit_flags({'TemplateFitCorrelation': 0.6, 'TemplateFitMirrorDistanceMM': 12.0})
    assert [f['kind'] for f in flags] == ['template_fit'] and '12.0 mm' in flags[0]['message']
    vols = {'Left_A': 1000.0, 'Right_A': 1300.0, 'Left_B': 50.0, 'Right_B': 10.0,
            'Left_C': 0.0, 'Right_C': 400.0, 'Vermis_D': 5.0}
    flags = qc.asymmetry_flags(vols)
    assert [f['structure'] for f in flags] == ['A', 'C']   # B is too small to judge
    # against the label set's own asymmetry (-0.26 for A): no flag
    assert [f['structure'] for f in qc.asymmetry_flags(vols, baseline={'A': -0.2})] == ['C']
    assert qc.label_asymmetry({'Left_A': 3, 'Right_A': 1}) == {'A': 1.0}
    mapping = {'Left.A': {'Left_A': 1, 'Vermis_D': 0.5}, 'Right.A': {'Right_A': 1}}
    ref = qc.reference_volumes(vols, mapping)
    assert ref == {'Left.A': 1002.5, 'Right.A': 1300.0, 'Total': 2302.5}
    ranges = {'Left.A': {'low': 500, 'high': 1500}, 'Right.A': {'low': 100, 'high': 1200},
              'Total': {'low': 0, 'high': 1e5}}
    assert [f['structure'] for f in qc.reference_flags(vols, ranges, mapping)] == ['Right.A']
    assert [f['structure'] for f in qc.uncertainty_flags({'X': 0.3, 'Y': 0.1, 'Z': None})] \
        == ['X']


def test_reference_ranges(tmp_path):
    csv = tmp_path / 'v.csv'
    csv.write_text('ID,ses,Left.I.V,Right.I.V\na,1,1,2\na,2,3,2\nb,1,5,4\nb,2,5,4\n')
    means = participant_means(csv, 1000.0)
    np.testing.assert_allclose(means['Left.I.V'], [2000, 5000])
    np.testing.assert_allclose(means['Total'], [4000, 9000])
    other = {k: v * 2 for k, v in means.items()}
    ranges = reference_ranges({'p': means, 'q': other}, n_sd=1.0)
    sd = np.std([2000, 5000], ddof=1)
    assert ranges['Left.I.V']['low'] == pytest.approx(3500 - sd)
    assert ranges['Left.I.V']['high'] == pytest.approx(7000 + 2 * sd)
    assert ranges['Total']['pipelines']['q']['n'] == 2


def test_reference_ranges_of_both_protocols(shared_data, tmp_path):
    """The default protocol (cobra, CERES) is checked against the reference pipelines' own
    ranges (CERES protocol: factors 1, every mapped label in its lookup table); SUIT against
    ranges scaled by its atlas's volumes."""
    from cerebseg.assets import package_json
    from cerebseg.assets.build import read_lut
    from cerebseg.assets.reference import build_reference

    section = build_reference(shared_data, tmp_path)
    doc = json.loads((tmp_path / section['cerebellum_volumes']).read_text())
    assert set(doc['protocols']) == {'suit', 'cobra'}
    for name, rng in doc['protocols']['cobra'].items():
        assert rng['factor'] == 1.0
        assert (rng['low'], rng['high']) == (doc['structures'][name]['low'],
                                             doc['structures'][name]['high'])
    assert len(doc['protocols']['cobra']) == 19             # 18 lobule groups and the total
    assert any(abs(r['factor'] - 1) > 0.05 for r in doc['protocols']['suit'].values())
    lut, _ = read_lut(shared_data, package_json('protocols/cobra.json'))
    names = {row['name'] for row in lut}
    mapping = package_json('reference_map.json')['protocols']['cobra']
    assert all(label in names for parts in mapping.values() for label in parts)
    assert sum(len(parts) for parts in mapping.values()) == 24   # every lobule, once


def test_bids_names_and_sidecars(tmp_path):
    src = '/raw/sub-01/ses-a/anat/sub-01_ses-a_run-1_T1w.nii.gz'
    name = derivative_path(tmp_path, src, 'dseg', '.nii.gz', space='MNI152NLin2009cAsym',
                           res='05', seg='cerebellum').name
    assert name == 'sub-01_ses-a_run-1_space-MNI152NLin2009cAsym_seg-cerebellum_res-05_dseg.nii.gz'
    fig = derivative_path(tmp_path, src, 'dseg', '.svg', datatype='figures', seg='brainstem')
    assert fig == tmp_path / 'sub-01/figures/sub-01_ses-a_run-1_seg-brainstem_dseg.svg'
    with pytest.raises(ValueError):
        derivative_path(tmp_path, src, 'dseg', '.svg', datatype='func')
    meta = sidecar_meta({'A': 1}, {'space': 'T1w'}, ['bids:raw:x.nii.gz'])
    assert meta == {'A': 1, 'SpatialReference': 'bids:raw:x.nii.gz'}
    assert 'Resolution' in sidecar_meta({}, {'space': 'MNI', 'res': '1'}, [])
    # the sink sets unset NIfTI units and keeps (renamed) QC keys
    img = make_nifti(tmp_path / 'in.nii.gz')
    assert nib.load(img).header.get_xyzt_units() == ('unknown', 'unknown')
    qc_file = tmp_path / 'qc.json'
    qc_file.write_text(json.dumps({'InputSkullStripped': True, 'Other': 1}))
    sink = DerivativesDataSink(base_directory=str(tmp_path / 'out'), source_file=src,
                               in_file=str(img), suffix='T1w', extension='.nii.gz',
                               entities={'desc': 'preproc'}, meta={'Description': 'x'},
                               meta_files=[str(qc_file)],
                               meta_keys={'InputSkullStripped': 'SkullStripped'})
    res = sink.run().outputs
    assert nib.load(res.out_file).header.get_xyzt_units() == ('mm', 'sec')
    np.testing.assert_array_equal(nib.load(res.out_file).get_fdata(), nib.load(img).get_fdata())
    assert json.loads(Path(res.out_meta).read_text()) == {'Description': 'x',
                                                         'SkullStripped': True}
    assert oct(Path(res.out_file).stat().st_mode & 0o777) != oct(0o600)


def test_bidsignore_and_lut(tmp_path):
    (tmp_path / '.bidsignore').write_text('mine/\n**/log\n')
    lines = write_bidsignore(tmp_path).read_text().splitlines()
    assert lines[0] == 'mine/' and set(BIDSIGNORE) <= set(lines)
    assert len(lines) == len(set(lines))
    lut = tmp_path / 'lut.tsv'
    lut.write_text('index\tname\tabbreviation\tcolor\tpart\n0\tbackground\tBG\t#000000\tn/a\n')
    write_lut(lut, tmp_path, 'brainstem')
    assert list(json.loads((tmp_path / 'seg-brainstem_dseg.json').read_text())) == ['part']
    lut.write_text('index\tname\tabbreviation\tcolor\n0\tbackground\tBG\t#000000\n')
    write_lut(lut, tmp_path, 'brainstem')   # only BIDS columns: no sidecar
    assert not (tmp_path / 'seg-brainstem_dseg.json').exists()
    rows = write_descriptions(tmp_path).read_text().splitlines()
    assert rows[0] == 'desc_id\tdescription' and rows[1].startswith('desc-preproc\t')


def _fake_run_outputs(out: Path, label='sub-01'):
    anat = out / 'sub-01' / 'anat'
    anat.mkdir(parents=True)
    rows = [('1', 'Left_A', 1000), ('2', 'Right_A', 1500), ('n/a', 'Whole', 2500)]
    (anat / f'{label}_seg-brainstem_morph.tsv').write_text(
        'index\tname\tvolume_mm3\tvolume_icv_fraction\n'
        + ''.join(f'{i}\t{n}\t{v}\t{v / 1e6:.6e}\n' for i, n, v in rows))
    (anat / f'{label}_space-T1w_seg-brainstem_dseg.json').write_text(json.dumps(
        {'Description': 'Brainstem test', 'Sources': ['bids:raw:sub-01/anat/sub-01_T1w.nii.gz'],
         'Mode': 'T1w', 'TemplateFitCorrelation': 0.3, 'IntracranialVolume_mm3': 1.2e6,
         'Method': {'Name': 'registration'}}))
    figures = out / 'sub-01' / 'figures'
    figures.mkdir(parents=True)
    anat_img, labels = _blob()
    plot_label_mosaic(anat_img, labels, (1, 1, 1), LUT,
                      figures / f'{label}_seg-brainstem_dseg.svg', 'Brainstem')


def test_participant_report(tmp_path):
    out = tmp_path / 'out'
    _fake_run_outputs(out)
    flags = participant_flags({'brainstem': {
        'rows': [{'name': 'Left_A', 'volume_mm3': '1000'}, {'name': 'Right_A',
                                                             'volume_mm3': '1500'}],
        'meta': {'TemplateFitCorrelation': 0.3}}})
    assert {f['kind'] for f in flags} == {'template_fit', 'asymmetry'}
    run = SimpleNamespace(label='sub-01', subject='01', session=None)
    from datetime import datetime, timedelta, timezone

    old = out / 'sub-01/log/old'
    write_status(out, run, old, started=datetime.now(timezone.utc) - timedelta(hours=1),
                 code=70, message='crashed', device='cpu', run_uuid='old', qc_flags=[])
    (old / 'crash-1-node.txt').write_text('Node: cerebseg_wf.atlas\nTraceback\nValueError: '
                                          'bad box\n')
    new = out / 'sub-01/log/new'
    write_status(out, run, new, started=datetime.now(timezone.utc), code=0, message='done',
                 device='cpu', run_uuid='new', qc_flags=flags)
    status, folder = latest_status(out, '01', 'sub-01')
    assert status['run_uuid'] == 'new' and folder == new
    page = write_participant_report(out, '01')
    text = page.read_text()
    assert page == out / 'sub-01.html'
    for needle in ('sub-01/figures/sub-01_seg-brainstem_dseg.svg', 'poor fit to the template',
                   'left/right asymmetry', 'No errors to report', 'References', 'Brainstem test',
                   '1,500'):
        assert needle in text, needle
    # the old run's crash is reported when it is the newest
    (new / 'sub-01_status.json').unlink()
    assert 'bad box' in write_participant_report(out, '01').read_text()


def test_a_cut_off_structure_is_flagged_and_not_measured(tmp_path):
    """A run whose image ends inside the brainstem: its sidecar's FieldOfView raises a
    field_of_view flag naming the structure and the labels; the report writes "not measured"
    for them and for the total, never a smaller number; no flag when nothing, or less than the
    limit of the whole structure, is cut off."""
    fov = {'Limit': 0.02, 'WholeShareOutside': 0.27, 'NotMeasured': ['Left_A'],
           'ShareOutside': {'Left_A': 0.41}}
    assert qc.field_of_view_flags({'FieldOfView': dict(fov, WholeShareOutside=0.0,
                                                       NotMeasured=[], ShareOutside={})},
                                  'cerebellum') == []
    # the tip of one label clipped, the whole within the limit: not flagged (the label is
    # still written n/a by the volume table)
    assert qc.field_of_view_flags({'FieldOfView': dict(fov, WholeShareOutside=0.004)},
                                  'cerebellum') == []
    assert qc.field_of_view_flags({}, 'cerebellum') == []
    out = tmp_path / 'out'
    _fake_run_outputs(out)
    anat = out / 'sub-01' / 'anat'
    (anat / 'sub-01_seg-brainstem_morph.tsv').write_text(
        'index\tname\tvolume_mm3\tvolume_icv_fraction\n1\tLeft_A\tn/a\tn/a\n'
        '2\tRight_A\t1500.0\t1.5e-03\nn/a\tWhole\tn/a\tn/a\n')
    meta_file = anat / 'sub-01_space-T1w_seg-brainstem_dseg.json'
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, FieldOfView=fov)))
    from cerebseg.bids_app.reports import run_results

    flags = participant_flags(run_results(out, 'sub-01'))
    cut = [f for f in flags if f['kind'] == 'field_of_view']
    assert len(cut) == 1 and cut[0]['structure'] == 'brainstem'
    assert '27 %' in cut[0]['message'] and 'Left_A 41 %' in cut[0]['message']
    assert not any(f['kind'] == 'asymmetry' for f in flags)   # one side unmeasured: no pair
    run = SimpleNamespace(label='sub-01', subject='01', session=None)
    from datetime import datetime, timezone

    write_status(out, run, out / 'sub-01/log/new', started=datetime.now(timezone.utc), code=0,
                 message='done', device='cpu', run_uuid='new', qc_flags=flags)
    text = write_participant_report(out, '01').read_text()
    assert text.count('not measured') >= 2 and 'ends inside the brainstem' in text
    assert '1,500' in text and '2,500' not in text


def test_participant_report_in_chromium(tmp_path):
    out = tmp_path / 'out'
    _fake_run_outputs(out)
    page = write_participant_report(out, '01')
    result = check_page(page, screenshot=tmp_path / 'shot.png')
    assert result['console'] == [], result['console']
    assert result['images'] and all(i['ok'] for i in result['images']), result['images']
    assert (tmp_path / 'shot.png').stat().st_size > 10_000
    (out / 'sub-01/figures/sub-01_seg-brainstem_dseg.svg').write_text('not an svg')
    assert not all(i['ok'] for i in check_page(page)['images'])


def test_methods_say_whether_the_outline_was_trimmed():
    from cerebseg.bids_app.metadata import FUSED_OUTLINE_TEXT, OUTLINE_TEXT, TISSUE_OUTLINE_TEXT
    from cerebseg.bids_app.reports import _methods
    from cerebseg.utils.outline import SUPPORT, TRIM_DEPTH_MM

    method = {'Name': 'multi-atlas', 'Registration': 'r.', 'Fusion': 'f.'}
    trimmed = _methods({'cerebellum': {'meta': {'Method': dict(method, Outline=OUTLINE_TEXT)}}})
    assert 'more CSF than tissue' in trimmed and 'more tissue than CSF' not in trimmed
    grown = _methods({'cerebellum': {'meta': {'Method': dict(method,
                                                             Outline=TISSUE_OUTLINE_TEXT)}}})
    assert 'more CSF than tissue' in grown and 'more tissue than CSF' in grown
    assert f'at least {SUPPORT:g},' in TISSUE_OUTLINE_TEXT   # the text says the support used
    assert f'up to {TRIM_DEPTH_MM:g} mm deep' in OUTLINE_TEXT   # and the trimming's depth
    fused = _methods({'cerebellum': {'meta': {'Method': dict(
        method, Outline=FUSED_OUTLINE_TEXT)}}})
    assert 'CSF' not in fused and 'as fused' not in fused


def test_methods_say_whether_the_lobule_borders_moved():
    from cerebseg.bids_app.metadata import BRANCHES_TEXT, FUSED_BORDERS_TEXT, borders_text
    from cerebseg.bids_app.reports import _methods
    from cerebseg.utils.branches import SHARPNESS

    method = {'Name': 'multi-atlas', 'Registration': 'r.', 'Fusion': 'f.'}
    moved = _methods({'cerebellum': {'meta': {'Method': dict(method,
                                                             LobuleBorders=BRANCHES_TEXT)}}})
    assert 'white-matter branches' in moved and 'corpus medullare' in moved
    assert f'to the power {SHARPNESS:g} ' in BRANCHES_TEXT   # the text says the exponent used
    fused = _methods({'cerebellum': {'meta': {'Method': dict(
        method, LobuleBorders=FUSED_BORDERS_TEXT)}}})
    assert 'branches' not in fused
    # with lobule votes the text names the voting atlas, its entries and the weights
    votes = {'protocol': 'suit', 'names': ['suit-A', 'suit-AMirror'], 'weight': 0.25}
    text = borders_text({'units': [0], 'sides': [0], 'votes': votes})
    assert text.startswith(BRANCHES_TEXT) and 'SUIT protocol' in text
    assert 'suit-A, suit-AMirror' in text and 'count 0.25 against 0.75' in text
    assert borders_text({'units': [0], 'sides': [0]}) == BRANCHES_TEXT
    assert borders_text(None) == FUSED_BORDERS_TEXT
