"""Label fusion numerics (NumPy reference)."""
import numpy as np
import pytest

from cerebseg.kernels.wmv import local_weights, weighted_majority_vote


def _brute_force(labels, images, target, n_labels, radius, beta=1.0, eps=1e-3):
    """Voxel-by-voxel evaluation of the documented formula."""
    k_atlas = labels.shape[0]
    shape = target.shape
    probs = np.zeros((n_labels,) + shape)
    pad = [(radius, radius)] * 3
    tp = np.pad(target, pad, mode='edge')
    ip = [np.pad(images[k], pad, mode='edge') for k in range(k_atlas)]
    for x in range(shape[0]):
        for y in range(shape[1]):
            for z in range(shape[2]):
                sl = (slice(x, x + 2 * radius + 1), slice(y, y + 2 * radius + 1),
                      slice(z, z + 2 * radius + 1))
                w = [(np.mean((tp[sl] - ip[k][sl]) ** 2) + eps) ** -beta for k in range(k_atlas)]
                for k in range(k_atlas):
                    probs[labels[k, x, y, z], x, y, z] += w[k]
                probs[:, x, y, z] /= sum(w)
    return probs


def test_matches_brute_force_formula():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(3, 7, 6, 5))
    images = rng.random((3, 7, 6, 5)).astype(np.float32)
    target = rng.random((7, 6, 5)).astype(np.float32)
    fused, probs = weighted_majority_vote(labels, images, target, 4, radius=1)
    ref = _brute_force(labels, images, target, 4, radius=1)
    np.testing.assert_allclose(probs, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(fused, np.argmax(ref, axis=0))


def test_probabilities_sum_to_one_and_background_outside_votes():
    rng = np.random.default_rng(2)
    labels = np.zeros((4, 16, 16, 16), np.int16)
    labels[:, 5:9, 5:9, 5:9] = rng.integers(0, 6, size=(4, 4, 4, 4))
    images = rng.random((4, 16, 16, 16)).astype(np.float32)
    target = rng.random((16, 16, 16)).astype(np.float32)
    fused, probs = weighted_majority_vote(labels, images, target, 6, radius=2)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-5)
    assert fused[0, 0, 0] == 0 and probs[0, 0, 0, 0] == 1.0
    assert fused.dtype == np.int16


def test_ties_go_to_lowest_label():
    labels = np.stack([np.full((5, 5, 5), 3), np.full((5, 5, 5), 2)])
    images = np.zeros((2, 5, 5, 5), np.float32)
    target = np.zeros((5, 5, 5), np.float32)
    fused, probs = weighted_majority_vote(labels, images, target, 4)
    assert np.all(fused == 2)
    np.testing.assert_allclose(probs[2], 0.5)


def test_better_matching_atlas_wins():
    rng = np.random.default_rng(3)
    target = rng.random((10, 10, 10)).astype(np.float32)
    good = target + 0.01 * rng.standard_normal(target.shape).astype(np.float32)
    bad = rng.random((10, 10, 10)).astype(np.float32)
    labels = np.stack([np.full(target.shape, v) for v in (1, 2, 2)])
    fused, _ = weighted_majority_vote(labels, np.stack([good, bad, bad]), target, 3)
    assert np.all(fused == 1)  # one similar atlas outvotes two dissimilar ones
    w = local_weights(np.stack([good, bad]), target)
    assert np.all(w[0] > w[1])


def test_missing_channel_uses_available_ones():
    rng = np.random.default_rng(4)
    t1 = rng.random((8, 8, 8)).astype(np.float32)
    t2 = rng.random((8, 8, 8)).astype(np.float32)
    images = np.stack([np.stack([t1, t2]), np.stack([t1, np.zeros_like(t2)])])
    target = np.stack([t1, t2])
    w = local_weights(images, target, available=np.array([[True, True], [True, False]]))
    np.testing.assert_allclose(w[0], w[1], rtol=1e-5)


@pytest.mark.parametrize('bad', ['labels_range', 'shape'])
def test_rejects_bad_inputs(bad):
    labels = np.zeros((2, 4, 4, 4), np.int16)
    images = np.zeros((2, 4, 4, 4), np.float32)
    target = np.zeros((4, 4, 4), np.float32)
    if bad == 'labels_range':
        labels[0, 0, 0, 0] = 9
        with pytest.raises(ValueError, match='labels must lie'):
            weighted_majority_vote(labels, images, target, 4)
    else:
        with pytest.raises(ValueError, match='shape'):
            weighted_majority_vote(labels, images[:, :3], target, 4)
