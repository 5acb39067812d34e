"""End to end against exact truth: a whole-brain template with its atlas under a known transform,
segmented by the real command with that template left out of the library (issue 9)."""
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import SUIT, write_case_bids

from cerebseg.assets.build import leave_out_entry
from cerebseg.bids_app.run import main
from cerebseg.utils.evaluation import whole_dice
from cerebseg.utils.truth import CaseSpec, case_volumes, make_case, truth_labels

T1W = 'templates/MNI152NLin6Asym/MNI152_T1_1mm_brain.nii.gz'
DSEG = 'atlases/cerebellum/Diedrichsen2009/Diedrichsen_2009/atl-Anatom_space-MNI_dseg.nii'


def test_truth_labels_ties_do_not_bias_volume():
    """Half-covered voxels go to the label on alternate voxels; majority label inside."""
    counts = np.zeros((3, 4, 4, 4), np.uint8)
    counts[0], counts[1] = 4, 4                         # every voxel half background, half 1
    lab = truth_labels(counts, 8)
    assert (lab == 1).sum() == 32 and (lab == 0).sum() == 32
    counts[:] = 0
    counts[1], counts[2] = 3, 5                         # all foreground: the majority wins
    assert (truth_labels(counts, 8) == 2).all()


def test_case_geometry_is_exact(shared_data):
    """Without displacement, the truth volume is the atlas volume times the affine's
    determinant, whatever the native grid (orientation and anisotropy)."""
    labels = nib.load(shared_data / DSEG)
    spec = CaseSpec(max_displacement_mm=0.0, margin_mm=2.0)
    case = make_case(nib.load(shared_data / T1W), labels, seed=3, n_labels=35, spec=spec,
                     grid=((1.3, 1.1, 1.0), ('P', 'I', 'R')))
    fwd = np.asarray(case.meta['affine_template_to_subject'])
    source = (np.asarray(labels.dataobj) > 0).sum() * np.prod(labels.header.get_zooms()[:3])
    expected = source * np.linalg.det(fwd[:3, :3])
    assert case_volumes(case)['total'] == pytest.approx(expected, rel=0.01)
    hard = (case.labels > 0).sum() * np.prod(case.meta['zooms'])
    assert hard == pytest.approx(expected, rel=0.01)
    assert nib.aff2axcodes(case.affine) == ('P', 'I', 'R')


@pytest.mark.integration
def test_exact_truth_case_end_to_end(shared_data, assets_dir, tmp_path):
    """The default command, native space, own template left out: total volume within 5 %,
    whole-cerebellum Dice >= 0.94 (the pipeline of issue 9's report gave +31 % and 0.85 on
    such a case; the fixed one 0.948 on this case and 0.947-0.950 on the benchmark's three, so
    issue 9's 0.95 is not reached yet with the template left out)."""
    case = make_case(nib.load(shared_data / T1W), nib.load(shared_data / DSEG), seed=11,
                     n_labels=35)
    bids = write_case_bids(tmp_path / 'bids', 'truth', case, 'exact truth')
    loo = leave_out_entry(assets_dir, tmp_path / 'assets', 'MNI152NLin6AsymC')
    manifest = json.loads((loo / 'manifest.json').read_text())
    assert 'MNI152NLin6AsymC' not in [e['name'] for e in manifest['libraries']['suit']['entries']]
    out = tmp_path / 'out'
    assert main([str(bids), str(out), 'participant', '--assets-dir', str(loo), *SUIT,
                 '-w', str(tmp_path / 'work'), '--skip-bids-validation',
                 '--skip-brainstem']) == 0   # (the brainstem: CI time)
    result = nib.load(out / 'sub-truth/anat/sub-truth_space-T1w_seg-cerebellum_dseg.nii.gz')
    assert np.allclose(result.affine, case.affine)
    pred = np.asarray(result.dataobj)
    volume = (pred > 0).sum() * np.prod(result.header.get_zooms()[:3])
    truth_volume = case_volumes(case)['total']
    error = volume / truth_volume - 1
    dice = whole_dice(pred, case.labels)
    assert abs(error) < 0.05, f'total volume {volume / 1000:.1f} mL vs truth ' \
                              f'{truth_volume / 1000:.1f} mL ({100 * error:+.1f} %)'
    assert dice >= 0.94, f'whole-cerebellum Dice {dice:.3f}'
