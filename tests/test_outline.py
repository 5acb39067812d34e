"""The native outline trimmed and grown by the image (:mod:`cerebseg.utils.outline`)."""
import numpy as np
import pytest

from cerebseg.utils.outline import (SUPPORT, grow_outline, outline_levels, tissue_outline,
                                    trim_outline)

CSF, GREY, WHITE = 300.0, 1000.0, 1400.0


def _phantom(radius=9.3, shape=(32, 32, 32), sub=4):
    """A ball of grey matter with a white core in CSF, with partial volume: the image is the
    mean of ``sub``^3 sub-samples per voxel; the truth is the voxels more than half inside."""
    grid = (np.indices((shape[0] * sub,) * 3) + 0.5) / sub - shape[0] / 2
    r = np.sqrt((grid ** 2).sum(0))
    fine = np.where(r < radius, np.where(r < radius / 2, WHITE, GREY), CSF)
    image = fine.reshape(shape[0], sub, shape[1], sub, shape[2], sub).mean((1, 3, 5))
    inside = (r < radius).reshape(shape[0], sub, shape[1], sub, shape[2], sub).mean((1, 3, 5))
    return image, inside > 0.5, inside.sum()


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_levels_find_csf_and_tissue():
    image, truth, _ = _phantom()
    csf, tissue = outline_levels(image, truth)
    assert csf == pytest.approx(CSF, abs=60)
    assert GREY - 50 < tissue < WHITE


def test_a_generous_outline_is_trimmed_to_the_partial_volume_midpoint():
    """Labels one voxel too large all round (as fusion of smooth templates draws them): the
    trimmed labels match the truth's volume within 3 % and overlap it better."""
    from scipy import ndimage as ndi

    image, truth, exact = _phantom()
    fused = ndi.binary_dilation(truth).astype(np.int16) * 3
    assert fused.sum() / 3 / exact > 1.25
    out, info = trim_outline(fused, image)
    assert 'skipped' not in info and info['removed_voxels'] > 0
    assert abs((out > 0).sum() / exact - 1) < 0.03
    assert _dice(out > 0, truth) > _dice(fused > 0, truth) + 0.05
    assert set(np.unique(out)) == {0, 3}                 # labels are kept, never invented
    assert not (out > 0)[~(fused > 0)].any()             # nothing is added


def test_layers_are_judged_from_outside_up_to_the_passes():
    """Labels two voxels too large all round: each pass takes one layer of CSF, so two passes
    match the truth's volume within 3 % and one pass leaves the deeper layer; more passes stop
    where the outline meets tissue. A dark voxel inside (a fissure the labels cover, no chain
    of dark voxels to the outside) keeps its label; the report counts each pass."""
    from scipy import ndimage as ndi

    image, truth, exact = _phantom()
    image[16, 16, 16] = CSF                               # an interior dark voxel
    fused = ndi.binary_dilation(truth, iterations=2).astype(np.int16)
    one, info1 = trim_outline(fused, image, passes=1)
    assert (one > 0).sum() / exact > 1.2                  # the deeper layer stays
    assert info1['passes'] == 1 and len(info1['removed_by_pass']) == 1
    two, info2 = trim_outline(fused, image, passes=2)
    assert abs((two > 0).sum() / exact - 1) < 0.03
    assert two[16, 16, 16] == 1
    assert info2['removed_voxels'] == sum(info2['removed_by_pass']) == (fused > two).sum()
    assert info2['removed_by_pass'][0] == info1['removed_voxels']
    more, info6 = trim_outline(fused, image, passes=6)
    assert np.array_equal(more, two) and len(info6['removed_by_pass']) == 2
    with pytest.raises(ValueError, match='passes=0'):
        trim_outline(fused, image, passes=0)


def test_passes_come_from_the_depth_in_mm():
    from cerebseg.utils.outline import TRIM_DEPTH_MM, trim_passes

    assert trim_passes((1.0, 1.0, 1.0)) == round(TRIM_DEPTH_MM) == 3
    assert trim_passes((1.0, 1.0, 1.2)) == 3 and trim_passes((0.9, 1.3, 0.9)) == 3
    assert trim_passes((0.5, 0.5, 0.5)) == 6
    assert trim_passes((4.0, 4.0, 4.0)) == 1
    with pytest.raises(ValueError, match='positive'):
        trim_passes((1.0, 0.0, 1.0))


def test_a_boundary_with_other_tissue_is_kept():
    """Half of a block of uniform tissue labelled (as the cerebellum borders the brainstem):
    nothing changes at the cut; the block's faces on CSF are trimmed only where dark."""
    image = np.full((20, 20, 20), CSF, np.float32)
    image[4:16, 4:16, 4:16] = GREY
    labels = np.zeros(image.shape, np.int16)
    labels[4:10, 4:16, 4:16] = 2
    out, info = trim_outline(labels, image)
    assert info['removed_voxels'] == 0
    assert np.array_equal(out, labels)


def test_no_contrast_no_change_and_shape_checked():
    rng = np.random.default_rng(0)
    image = 1000 + rng.normal(0, 5, (16, 16, 16)).astype(np.float32)
    labels = np.zeros(image.shape, np.int16)
    labels[4:12, 4:12, 4:12] = 1
    out, info = trim_outline(labels, image)
    assert 'skipped' in info and np.array_equal(out, labels)
    empty, info = trim_outline(np.zeros_like(labels), image)
    assert info['skipped'] == 'no labels'
    with pytest.raises(ValueError, match='differ in shape'):
        trim_outline(labels, image[1:])


def test_skull_stripped_zeros_do_not_set_the_csf_level():
    """Zeros outside a brain mask are not CSF: the level comes from the non-zero shell."""
    image, truth, _ = _phantom()
    stripped = image.copy()
    stripped[:, :, :5] = 0
    assert outline_levels(stripped, truth) == pytest.approx(outline_levels(image, truth),
                                                            rel=0.02)


def test_a_tight_outline_is_grown_to_the_partial_volume_midpoint():
    """Labels one voxel too small all round (as fusion of smaller anatomies draws them), the
    fused probability of the structure 0.4 on the missing layer: the grown labels match the
    truth's volume within 3 % and overlap it better; the labels keep their values."""
    from scipy import ndimage as ndi

    image, truth, exact = _phantom()
    tight = ndi.binary_erosion(truth)
    fused = np.where(tight, np.where(np.indices(truth.shape)[0] < 16, 4, 7), 0).astype(np.int16)
    foreground = np.where(tight, 0.9, np.where(ndi.binary_dilation(tight, iterations=2), 0.4,
                                               0.0)).astype(np.float32)
    assert (fused > 0).sum() / exact < 0.85
    out, info = grow_outline(fused, image, foreground)
    assert 'skipped' not in info and info['added_voxels'] > 0
    assert abs((out > 0).sum() / exact - 1) < 0.03
    assert _dice(out > 0, truth) > _dice(fused > 0, truth) + 0.05
    assert np.array_equal(out[fused > 0], fused[fused > 0])      # nothing inside changes
    assert set(np.unique(out)) == {0, 4, 7}
    # each added voxel took the label of its side
    added = (out > 0) & (fused == 0)
    x = np.indices(truth.shape)[0]
    assert (out[added & (x < 15)] == 4).all() and (out[added & (x > 16)] == 7).all()
    # one layer only: a second call from the grown labels is what a second layer would add
    assert not (added & ~ndi.binary_dilation(fused > 0)).any()


def test_growth_needs_the_entries_support_and_a_csf_neighbour():
    """Where the fusion gives the structure less than SUPPORT nothing is added; nor across a
    boundary with other tissue (a block of tissue half labelled: the cut does not move, though
    the fusion gives the unlabelled half some probability)."""
    from scipy import ndimage as ndi

    image, truth, _ = _phantom()
    tight = ndi.binary_erosion(truth).astype(np.int16)
    weak = np.where(tight > 0, 0.9, SUPPORT - 0.05).astype(np.float32)
    out, info = grow_outline(tight, image, weak)
    assert info['added_voxels'] == 0 and np.array_equal(out, tight)

    block = np.full((20, 20, 20), CSF, np.float32)
    block[4:16, 4:16, 4:16] = GREY
    labels = np.zeros(block.shape, np.int16)
    labels[5:10, 5:15, 5:15] = 2                 # one voxel short of the block's faces on CSF
    foreground = np.full(block.shape, 0.5, np.float32)
    out, info = grow_outline(labels, block, foreground)
    added = (out > 0) & (labels == 0)
    assert info['added_voxels'] == added.sum() > 0
    assert not added[10:].any()                  # the cut inside the block stays where it was
    assert added[4, 5:15, 5:15].all()            # the face on CSF grew by its voxel layer


def test_tissue_outline_trims_then_grows_without_undoing_the_trim():
    """A generous outline on one side, a tight one on the other: both are corrected, and a
    trimmed voxel is never added back; the report counts both."""
    from scipy import ndimage as ndi

    image, truth, exact = _phantom()
    x = np.indices(truth.shape)[0]
    fused = np.where(x < 16, ndi.binary_dilation(truth), ndi.binary_erosion(truth))
    fused = fused.astype(np.int16)
    foreground = ndi.binary_dilation(truth, iterations=2).astype(np.float32) * 0.5
    out, info = tissue_outline(fused, image, foreground)
    assert info['removed_voxels'] > 0 and info['added_voxels'] > 0
    assert abs((out > 0).sum() / exact - 1) < 0.03
    trimmed, _ = trim_outline(fused, image)
    removed = (fused > 0) & (trimmed == 0)
    assert not (out[removed] > 0).any()
    with pytest.raises(ValueError, match='differ in shape'):
        grow_outline(fused, image, foreground[1:])
    flat = np.full(image.shape, 1000, np.float32)
    same, info = tissue_outline(fused, flat, foreground)
    assert 'skipped' in info and np.array_equal(same, fused)
