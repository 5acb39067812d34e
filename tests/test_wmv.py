"""Label fusion numerics (NumPy reference)."""
import numpy as np
import pytest

from cerebseg.kernels.wmv import (compiled_kernel, local_weights, weighted_majority_vote,
                                  weighted_majority_vote_numpy)

needs_kernel = pytest.mark.skipif(compiled_kernel() is None,
                                  reason='compiled kernel not built')
IMPLEMENTATIONS = [pytest.param(weighted_majority_vote_numpy, id='numpy'),
                   pytest.param(lambda *a, **k: weighted_majority_vote(*a, use_compiled=True,
                                                                       num_threads=2, **k),
                                id='compiled', marks=needs_kernel)]


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


@pytest.mark.parametrize('wmv', IMPLEMENTATIONS)
def test_matches_brute_force_formula(wmv):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(3, 7, 6, 5))
    images = rng.random((3, 7, 6, 5)).astype(np.float32)
    target = rng.random((7, 6, 5)).astype(np.float32)
    fused, probs = wmv(labels, images, target, 4, radius=1)
    ref = _brute_force(labels, images, target, 4, radius=1)
    np.testing.assert_allclose(probs, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(fused, np.argmax(ref, axis=0))


@pytest.mark.parametrize('wmv', IMPLEMENTATIONS)
def test_probabilities_sum_to_one_and_background_outside_votes(wmv):
    rng = np.random.default_rng(2)
    labels = np.zeros((4, 16, 16, 16), np.int16)
    labels[:, 5:9, 5:9, 5:9] = rng.integers(0, 6, size=(4, 4, 4, 4))
    images = rng.random((4, 16, 16, 16)).astype(np.float32)
    target = rng.random((16, 16, 16)).astype(np.float32)
    fused, probs = wmv(labels, images, target, 6, radius=2)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-5)
    assert fused[0, 0, 0] == 0 and probs[0, 0, 0, 0] == 1.0
    assert fused.dtype == np.int16


@pytest.mark.parametrize('wmv', IMPLEMENTATIONS)
def test_ties_go_to_lowest_label(wmv):
    labels = np.stack([np.full((5, 5, 5), 3), np.full((5, 5, 5), 2)])
    images = np.zeros((2, 5, 5, 5), np.float32)
    target = np.zeros((5, 5, 5), np.float32)
    fused, probs = wmv(labels, images, target, 4)
    assert np.all(fused == 2)
    np.testing.assert_allclose(probs[2], 0.5)


@pytest.mark.parametrize('wmv', IMPLEMENTATIONS)
def test_better_matching_atlas_wins(wmv):
    rng = np.random.default_rng(3)
    target = rng.random((10, 10, 10)).astype(np.float32)
    good = target + 0.01 * rng.standard_normal(target.shape).astype(np.float32)
    bad = rng.random((10, 10, 10)).astype(np.float32)
    labels = np.stack([np.full(target.shape, v) for v in (1, 2, 2)])
    fused, _ = wmv(labels, np.stack([good, bad, bad]), target, 3)
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


@needs_kernel
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_kernel_equals_twin_on_random_inputs(seed):
    """Random labels, intensities, two channels with a missing one, any thread count."""
    rng = np.random.default_rng(seed)
    shape = (23, 17, 19)
    labels = np.zeros((5,) + shape, np.int16)
    labels[:, 3:20, 2:15, 4:17] = rng.integers(0, 8, size=(5, 17, 13, 13))
    images = rng.random((5, 2) + shape).astype(np.float32)
    target = rng.random((2,) + shape).astype(np.float32)
    available = np.ones((5, 2), bool)
    available[1, 1] = available[3, 1] = False
    ref_fused, ref_probs = weighted_majority_vote_numpy(labels, images, target, 8, available)
    for threads in (1, 2):
        fused, probs = weighted_majority_vote(labels, images, target, 8, available,
                                              use_compiled=True, num_threads=threads)
        np.testing.assert_allclose(probs, ref_probs, rtol=2e-5, atol=1e-6)
        top2 = np.sort(ref_probs, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-4  # no near-tie: the labels must be identical
        np.testing.assert_array_equal(fused[clear], ref_fused[clear])


@needs_kernel
def test_kernel_equals_twin_on_real_library(assets_dir):
    """The three SUIT entries voting on the MNI152NLin2009cSymC entry's image (a real case)."""
    import nibabel as nib

    lib = assets_dir / 'suit'
    names = ['SUIT', 'MNI152NLin6AsymC', 'MNI152NLin2009cSymC']
    crop = (slice(60, 190), slice(20, 150), slice(40, 150))
    labels = np.stack([np.asarray(nib.load(lib / f'entry-{n}_dseg.nii.gz').dataobj)[crop]
                       for n in names]).astype(np.int16)
    images = np.stack([np.asarray(nib.load(lib / f'entry-{n}_T1w.nii.gz').dataobj)[crop]
                       for n in names]).astype(np.float32)
    target = images[2] + 0.05 * np.random.default_rng(0).standard_normal(images[2].shape)
    ref_fused, ref_probs = weighted_majority_vote_numpy(labels, images, target, 35)
    fused, probs = weighted_majority_vote(labels, images, target, 35, use_compiled=True,
                                          num_threads=2)
    np.testing.assert_allclose(probs, ref_probs, rtol=2e-5, atol=1e-6)
    top2 = np.sort(ref_probs, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(fused[clear], ref_fused[clear])
