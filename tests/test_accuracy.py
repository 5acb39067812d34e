"""Exact-truth cases (issue 9): a whole-brain template with its atlas under a known transform,
the truth on the native grid exact. ``benchmarks/accuracy.py`` segments such cases with the real
command (each template left out of the library) and prints their table; CI's end-to-end run
against exact truth is ``test_real_anatomy`` (real individual anatomy, the default library).
"""

import nibabel as nib
import numpy as np
import pytest

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
