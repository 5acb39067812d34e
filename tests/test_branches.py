"""Lobule borders moved onto white-matter branches (cerebseg.utils.branches), on phantoms."""
import numpy as np
import pytest

from cerebseg.utils.branches import relabel_by_branches, swap_probabilities

# labels: 1 lobule A left, 2 lobule B left, 3 corpus medullare left, 4-6 the same on the right
UNITS = [0, 1, 2, 0, 1, 2, 0]
SIDES = [0, 1, 1, 1, 2, 2, 2]
WM, GM, CSF = 1.0, 0.6, 0.1


def phantom(border_y: int):
    """Two lobules on a corpus medullare (z < 10), each a white-matter slab (A: y 10-19,
    B: y 26-35; z 10-30) in 3 voxels of grey matter (2 on top); their cortices touch at y = 23
    with no CSF between (a fissure the image does not show). Truth: A below y = 23, B from
    it. The prior puts the border at ``border_y`` instead. x < 20 is the left side."""
    shape = (40, 46, 40)
    image = np.full(shape, CSF, np.float32)
    truth = np.zeros(shape, np.int16)
    image[:, 4:42, 0:10] = WM
    truth[:, 4:42, 0:10] = 3
    for first, last, label in ((7, 23, 1), (23, 39, 2)):
        truth[:, first:last, 10:33] = label
        image[:, first:last, 10:33] = GM
    image[:, 10:20, 10:31] = WM
    image[:, 26:36, 10:31] = WM
    right = np.zeros(shape, bool)
    right[20:] = True
    truth = np.where(right & (truth > 0), truth + 3, truth).astype(np.int16)
    prior = truth.copy()
    lobule = np.isin(truth, (1, 2, 4, 5))
    ys = np.arange(shape[1])[None, :, None] * np.ones(shape, int)
    prior[lobule & (ys < border_y)] = np.where(right, 4, 1)[lobule & (ys < border_y)]
    prior[lobule & (ys >= border_y)] = np.where(right, 5, 2)[lobule & (ys >= border_y)]
    return image, truth, prior


def test_a_branch_takes_back_its_folium():
    image, truth, prior = phantom(border_y=28)   # A reaches 5 voxels into B
    assert (prior != truth).sum() > 0
    out, info = relabel_by_branches(image, prior, UNITS, SIDES, zooms=(0.5, 0.5, 0.5))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, truth)
    assert info['changed_voxels'] == int((prior != truth).sum())
    assert info['grey_level'] == pytest.approx(GM) and info['white_level'] == pytest.approx(WM)


def test_outline_corpus_medullare_and_sides_never_change():
    image, truth, prior = phantom(border_y=28)
    out, _ = relabel_by_branches(image, prior, UNITS, SIDES, zooms=(0.5, 0.5, 0.5))
    np.testing.assert_array_equal(out > 0, prior > 0)
    np.testing.assert_array_equal(np.isin(out, (3, 6)), np.isin(prior, (3, 6)))
    side = np.asarray(SIDES)
    np.testing.assert_array_equal(side[out], side[prior])


def test_labels_the_library_agreed_on_stay():
    image, truth, prior = phantom(border_y=28)
    agreement = np.full(prior.shape, 0.6, np.float32)
    agreed = np.zeros(prior.shape, bool)
    agreed[:, :, 20:] = True                     # the upper half: every entry voted the same
    agreement[agreed] = 1.0
    out, _ = relabel_by_branches(image, prior, UNITS, SIDES, zooms=(0.5, 0.5, 0.5),
                                 agreement=agreement)
    np.testing.assert_array_equal(out[agreed], prior[agreed])
    np.testing.assert_array_equal(out[~agreed], truth[~agreed])
    assert (prior[~agreed] != truth[~agreed]).any()


def test_an_even_split_branch_is_left_alone():
    # the prior cuts branch B in half: no majority of 60 %, nothing to follow
    image, _, prior = phantom(border_y=31)
    out, info = relabel_by_branches(image, prior, UNITS, SIDES, zooms=(0.5, 0.5, 0.5))
    np.testing.assert_array_equal(out, prior)
    assert info['changed_voxels'] == 0


def test_no_white_matter_contrast_changes_nothing():
    image, _, prior = phantom(border_y=28)
    flat = np.where(prior > 0, GM, CSF).astype(np.float32)
    out, info = relabel_by_branches(flat, prior, UNITS, SIDES, zooms=(0.5, 0.5, 0.5))
    np.testing.assert_array_equal(out, prior)
    assert 'skipped' in info


def test_a_unit_of_several_labels_takes_the_nearest_one():
    # B is two labels (2 near A, 7 far from it) of one unit: a voxel that becomes B takes 2
    image, truth, prior = phantom(border_y=28)
    units, sides = [*UNITS, 2], [*SIDES, 1]
    far = (np.arange(prior.shape[1]) >= 34)[None, :, None] & (prior == 2)
    prior = np.where(far, 7, prior).astype(np.int16)
    truth = np.where(far, 7, truth).astype(np.int16)
    out, _ = relabel_by_branches(image, prior, units, sides, zooms=(0.5, 0.5, 0.5))
    np.testing.assert_array_equal(out, truth)


def test_labels_without_a_unit_are_refused():
    image, _, prior = phantom(border_y=28)
    with pytest.raises(ValueError, match='Label 6 has no unit'):
        relabel_by_branches(image, prior, UNITS[:5], SIDES[:5])


def test_swapped_probabilities_keep_the_background():
    rng = np.random.default_rng(0)
    probs = rng.integers(20, 120, (4, 5, 6, 7)).astype(np.uint8)
    probs[0] = rng.integers(0, 20, (5, 6, 7))   # foreground everywhere: the outline is kept
    before = probs.argmax(0)
    after = before.copy()
    after[1:3] = np.where(before[1:3] == 3, 1, 3)[...]
    out = swap_probabilities(probs, before, after)
    np.testing.assert_array_equal(out[0], probs[0])
    np.testing.assert_array_equal(np.sort(out, 0), np.sort(probs, 0))
    np.testing.assert_array_equal(out.max(0), probs.max(0))
    assert (np.take_along_axis(out, after[None], 0)[0] == probs.max(0)).all()
