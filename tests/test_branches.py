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


def fused_probabilities(prior, band: int = 8, hesitation: float = 0.45):
    """(7, X, Y, Z) probabilities as a fusion gives them: near the prior's border between A
    and B the entries hesitate, the other lobule of the same side getting ``hesitation`` at
    the border and less with the distance (none from ``band`` voxels along y); elsewhere
    they agree."""
    probs = np.zeros((len(UNITS),) + prior.shape, np.float32)
    np.put_along_axis(probs, prior[None].astype(np.int64), 1.0, 0)
    b = np.isin(prior, (2, 5))
    border = np.where(b.any(1), b.argmax(1), prior.shape[1])[:, None, :] - 0.5
    distance = np.abs(np.arange(prior.shape[1])[None, :, None] - border) - 0.5
    other = hesitation * np.clip(1 - distance / band, 0, 1)
    for own, alt in ((1, 2), (2, 1), (4, 5), (5, 4)):
        where = prior == own
        probs[own][where] = 1 - other[where]
        probs[alt][where] = other[where]
    return probs


def relabel(image, prior, probs=None, units=UNITS, sides=SIDES):
    probs = fused_probabilities(prior) if probs is None else probs
    return relabel_by_branches(image, prior, probs, units, sides, zooms=(0.5, 0.5, 0.5))


def test_a_branch_takes_back_its_folium():
    image, truth, prior = phantom(border_y=27)   # A reaches 4 voxels (2 mm) into B
    assert (prior != truth).sum() > 0
    out, info = relabel(image, prior)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, truth)
    assert info['changed_voxels'] == int((prior != truth).sum())
    assert info['grey_level'] == pytest.approx(GM) and info['white_level'] == pytest.approx(WM)


def test_outline_corpus_medullare_and_sides_never_change():
    image, truth, prior = phantom(border_y=28)
    out, _ = relabel(image, prior)
    np.testing.assert_array_equal(out > 0, prior > 0)
    np.testing.assert_array_equal(np.isin(out, (3, 6)), np.isin(prior, (3, 6)))
    side = np.asarray(SIDES)
    np.testing.assert_array_equal(side[out], side[prior])


def test_labels_the_library_agreed_on_stay():
    # where every entry voted for the voxel's label no other lobule has a probability to win
    image, truth, prior = phantom(border_y=28)
    probs = fused_probabilities(prior)
    agreed = np.zeros(prior.shape, bool)
    agreed[:, :, 20:] = True
    probs[:, agreed] = 0.0
    np.put_along_axis(probs, np.where(agreed, prior, 0)[None].astype(np.int64), 1.0, 0)
    probs[0][~agreed & (prior > 0)] = 0.0
    out, _ = relabel(image, prior, probs)
    np.testing.assert_array_equal(out[agreed], prior[agreed])
    np.testing.assert_array_equal(out[~agreed], truth[~agreed])
    assert (prior[~agreed] != truth[~agreed]).any()


def test_an_even_split_branch_is_left_alone():
    # the prior cuts branch B in half: its shares are even, the probabilities decide
    image, _, prior = phantom(border_y=31)
    out, info = relabel(image, prior)
    np.testing.assert_array_equal(out, prior)
    assert info['changed_voxels'] == 0


def test_the_borders_move_with_the_prior_a_row_at_a_time():
    # a hard rule (a branch takes its majority lobule from 60 %) moves the output by the 8
    # hesitant rows at once when the prior's border crosses 60 % of branch B; weighed by the
    # shares, one row of the prior moves the output by 3 rows at most (measured: 0 to 3)
    image, _, _ = phantom(border_y=28)
    row = 40 * 23   # voxels of one y row of lobule tissue (x by z)
    outs = [relabel(image, phantom(border_y=y)[2])[0] for y in range(26, 33)]
    moved = [int((a != b).sum()) for a, b in zip(outs, outs[1:])]
    assert max(moved) <= 3 * row, moved
    assert sum(moved) > 0


def test_no_lobule_is_given_where_no_entry_proposed_it():
    image, truth, prior = phantom(border_y=28)
    probs = fused_probabilities(prior)
    probs[2][prior == 1] = 0.0              # no entry voted B where the prior says A (left)
    probs[1][prior == 1] = 1.0
    out, _ = relabel(image, prior, probs)
    left = np.zeros(prior.shape, bool)
    left[:20] = True
    np.testing.assert_array_equal(out[left], prior[left])
    assert (out[~left] != prior[~left]).any()      # the right side's entries hesitated


def test_where_the_entries_agreed_nothing_moves_whatever_the_branch():
    """Every entry put B on two rows of A's cortex (one-hot probabilities): those voxels lie
    nearer A's branch, whose share of B is 0, so no lobule scores above 0 there; they keep B
    (neither lobule has anything to win; B is not unit 1, which an arg-max of zeros gives)."""
    image, truth, prior = phantom(border_y=21)
    assert (prior != truth).sum() > 0
    probs = np.zeros((len(UNITS),) + prior.shape, np.float32)
    np.put_along_axis(probs, prior[None].astype(np.int64), 1.0, 0)
    out, info = relabel(image, prior, probs)
    np.testing.assert_array_equal(out, prior)
    assert info['changed_voxels'] == 0


def test_no_white_matter_contrast_changes_nothing():
    image, _, prior = phantom(border_y=28)
    flat = np.where(prior > 0, GM, CSF).astype(np.float32)
    out, info = relabel(flat, prior)
    np.testing.assert_array_equal(out, prior)
    assert 'skipped' in info


def test_a_unit_of_several_labels_takes_the_nearest_one():
    # B is two labels (2 near A, 7 far from it) of one unit: a voxel that becomes B takes 2
    image, truth, prior = phantom(border_y=27)
    units, sides = [*UNITS, 2], [*SIDES, 1]
    probs = fused_probabilities(prior)
    far = (np.arange(prior.shape[1]) >= 34)[None, :, None] & (prior == 2)
    prior = np.where(far, 7, prior).astype(np.int16)
    truth = np.where(far, 7, truth).astype(np.int16)
    probs = np.concatenate([probs, np.where(far, probs[2], 0)[None]])
    probs[2][far] = 0.0
    out, _ = relabel(image, prior, probs, units, sides)
    np.testing.assert_array_equal(out, truth)


def test_labels_without_a_unit_or_probabilities_that_do_not_fit_are_refused():
    image, _, prior = phantom(border_y=28)
    probs = fused_probabilities(prior)
    with pytest.raises(ValueError, match='Label 6 has no unit'):
        relabel_by_branches(image, prior, probs[:5], UNITS[:5], SIDES[:5])
    with pytest.raises(ValueError, match='do not fit'):
        relabel_by_branches(image, prior, probs[:, 1:], UNITS, SIDES)


def test_uint8_probabilities_give_the_same_labels():
    image, _, prior = phantom(border_y=28)
    probs = fused_probabilities(prior)
    as_bytes = np.rint(probs * 255).astype(np.uint8)
    np.testing.assert_array_equal(relabel(image, prior, as_bytes)[0],
                                  relabel(image, prior, probs)[0])


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


def unit_votes(labels, units=UNITS, n_units=2):
    """(n_units + 1, X, Y, Z) one-hot unit probabilities of ``labels``: an independent
    library that votes exactly these units (sides merged)."""
    votes = np.zeros((n_units + 1,) + labels.shape, np.float32)
    unit = np.asarray(units)[labels]
    np.put_along_axis(votes, unit[None].astype(np.int64), 1.0, 0)
    votes[0] = 0.0
    return votes


def test_independent_votes_give_back_a_branch_the_library_gave_its_neighbour():
    # the prior gives 7 of branch B's 10 rows to A: alone, the branch's shares favour A and
    # pull more of B into A; a second library that puts the border on the fissure (the
    # libraries weigh the same) gives B all its folia back
    image, truth, prior = phantom(border_y=33)
    probs = fused_probabilities(prior)
    kwargs = dict(zooms=(0.5, 0.5, 0.5))
    alone, _ = relabel_by_branches(image, prior, probs, UNITS, SIDES, **kwargs)
    assert (alone != truth).sum() > (prior != truth).sum()
    out, info = relabel_by_branches(image, prior, probs, UNITS, SIDES,
                                    votes=unit_votes(truth), **kwargs)
    np.testing.assert_array_equal(out, truth)
    assert info['votes_weight'] == 0.5
    # uint8 votes (as the fusion writes them) give the same labels
    votes8 = np.rint(unit_votes(truth) * 255).astype(np.uint8)
    out8, _ = relabel_by_branches(image, prior, probs, UNITS, SIDES, votes=votes8, **kwargs)
    np.testing.assert_array_equal(out8, truth)
    # weight 0, or votes with no lobule anywhere, change nothing
    for votes, weight in ((unit_votes(truth), 0.0), (np.zeros((3,) + prior.shape), 0.5)):
        same, _ = relabel_by_branches(image, prior, probs, UNITS, SIDES, votes=votes,
                                      votes_weight=weight, **kwargs)
        np.testing.assert_array_equal(same, alone)
    # outline, corpus medullare and sides never change, whatever the votes
    wrong, _ = relabel_by_branches(image, prior, probs, UNITS, SIDES, votes_weight=1.0,
                                   votes=unit_votes(np.where(prior == 1, 2, prior)), **kwargs)
    np.testing.assert_array_equal(wrong > 0, prior > 0)
    np.testing.assert_array_equal(np.isin(wrong, (3, 6)), np.isin(prior, (3, 6)))
    np.testing.assert_array_equal(np.asarray(SIDES)[wrong], np.asarray(SIDES)[prior])


def test_votes_that_do_not_fit_are_refused():
    image, truth, prior = phantom(border_y=31)
    with pytest.raises(ValueError, match='Unit votes of shape'):
        relabel_by_branches(image, prior, fused_probabilities(prior), UNITS, SIDES,
                            votes=unit_votes(truth, n_units=3))
