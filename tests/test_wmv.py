"""Label fusion numerics: the NumPy reference, the compiled kernel and their agreement."""
import numpy as np
import pytest

from cerebseg.kernels.wmv import (LabelFusion, compiled_kernel, local_weights, undecided,
                                  weighted_majority_vote, weighted_majority_vote_numpy)

needs_kernel = pytest.mark.skipif(compiled_kernel() is None,
                                  reason='compiled kernel not built')


def _dense(use_compiled):
    """weighted_majority_vote as (fused, dense probabilities), like the twin returns."""
    def run(*args, **kwargs):
        res = weighted_majority_vote(*args, use_compiled=use_compiled, num_threads=2, **kwargs)
        return res.fused, res.dense()
    return run


IMPLEMENTATIONS = [pytest.param(weighted_majority_vote_numpy, id='numpy'),
                   pytest.param(_dense(False), id='numpy-compact'),
                   pytest.param(_dense(True), id='compiled', marks=needs_kernel)]


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


def _assert_matches_twin(res, ref_fused, ref_probs):
    """A compact result against the twin's dense one: probabilities, labels and the layout."""
    assert isinstance(res, LabelFusion) and res.fused.dtype == np.int16
    assert res.probs.dtype == np.float32 and res.index.dtype == np.int64
    probs = res.dense()
    np.testing.assert_allclose(probs, ref_probs, rtol=2e-5, atol=1e-6)
    top2 = np.sort(ref_probs, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4  # no near-tie: the labels must be identical
    np.testing.assert_array_equal(res.fused[clear], ref_fused[clear])
    np.testing.assert_array_equal(res.fused, np.argmax(probs, axis=0))  # its own tie rule
    np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, rtol=1e-5)


def _disagree(labels):
    return np.flatnonzero((labels != labels[:1]).any(axis=0))


@needs_kernel
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_kernel_equals_twin_on_random_inputs(seed):
    """Random labels, intensities, two channels with a missing one, any thread count.

    Two x-planes inside the votes agree everywhere (the kernel restarts its x-window after
    them), and one region lies on the volume border (clamped cubes).
    """
    rng = np.random.default_rng(seed)
    shape = (23, 17, 19)
    labels = np.zeros((5,) + shape, np.int16)
    labels[:, 3:20, 2:15, 4:17] = rng.integers(0, 8, size=(5, 17, 13, 13))
    labels[:, 10:12] = 3
    labels[:, 20:, 15:, :3] = rng.integers(0, 8, size=(5, 3, 2, 3))
    images = rng.random((5, 2) + shape).astype(np.float32)
    target = rng.random((2,) + shape).astype(np.float32)
    available = np.ones((5, 2), bool)
    available[1, 1] = available[3, 1] = False
    ref_fused, ref_probs = weighted_majority_vote_numpy(labels, images, target, 8, available)
    for threads in (1, 2, 3, 64):
        res = weighted_majority_vote(labels, images, target, 8, available, use_compiled=True,
                                     num_threads=threads)
        _assert_matches_twin(res, ref_fused, ref_probs)
        np.testing.assert_array_equal(res.index, _disagree(labels))


@needs_kernel
@pytest.mark.parametrize('radius,beta', [(1, 1.0), (3, 2.0), (2, 0.5)])
def test_kernel_equals_twin_everywhere_random(radius, beta):
    """Votes over the whole volume, other radii and exponents."""
    rng = np.random.default_rng(radius)
    labels = rng.integers(0, 3, size=(4, 9, 11, 8)).astype(np.int16)
    images = rng.random((4, 9, 11, 8)).astype(np.float32)
    target = rng.random((9, 11, 8)).astype(np.float32)
    ref = weighted_majority_vote_numpy(labels, images, target, 3, radius=radius, beta=beta)
    res = weighted_majority_vote(labels, images, target, 3, radius=radius, beta=beta,
                                 use_compiled=True, num_threads=2)
    _assert_matches_twin(res, *ref)


@pytest.mark.parametrize('use_compiled', [pytest.param(True, marks=needs_kernel), False])
def test_where_atlases_agree_probability_is_exactly_one(use_compiled):
    """Unanimous voxels are not in the compact result and get P = 1 exactly, whatever the
    intensities; the others are listed in C order."""
    rng = np.random.default_rng(5)
    labels = np.full((3, 12, 10, 9), 2, np.int16)
    labels[:, :4] = 0
    labels[1, 6, 3, 4] = 1
    labels[2, 8, 5:7, 2] = 4
    images = rng.random((3, 12, 10, 9)).astype(np.float32) * 100
    target = rng.random((12, 10, 9)).astype(np.float32)
    res = weighted_majority_vote(labels, images, target, 5, use_compiled=use_compiled)
    np.testing.assert_array_equal(res.index, np.ravel_multi_index(
        ([6, 8, 8], [3, 5, 6], [4, 2, 2]), (12, 10, 9)))
    assert res.probs.shape == (3, 5)
    probs = res.dense()
    agree = np.ones((12, 10, 9), bool)
    agree.flat[res.index] = False
    assert np.all(probs[2][agree & (labels[0] == 2)] == 1.0)
    assert np.all(probs[0][agree & (labels[0] == 0)] == 1.0)
    assert np.all(probs[:, agree].sum(axis=0) == 1.0)
    assert np.all(res.fused[agree] == labels[0][agree])
    assert np.all(res.probs[0, [0, 3, 4]] == 0) and res.probs[0, 1] > 0 and res.probs[0, 2] > 0


@needs_kernel
def test_kernel_when_all_agree_or_all_background():
    rng = np.random.default_rng(6)
    images = rng.random((3, 6, 7, 8)).astype(np.float32)
    target = rng.random((6, 7, 8)).astype(np.float32)
    for value in (0, 3):
        labels = np.full((3, 6, 7, 8), value, np.int16)
        res = weighted_majority_vote(labels, images, target, 4, use_compiled=True)
        assert res.index.size == 0 and res.probs.shape == (0, 4)
        assert np.all(res.fused == value)
        assert np.all(res.dense()[value] == 1.0)


@needs_kernel
@pytest.mark.parametrize('bad', [-1, 6, 40000])
def test_kernel_rejects_labels_out_of_range(bad):
    labels = np.zeros((2, 4, 5, 6), np.int32 if bad == 40000 else np.int16)
    labels[1, 2, 3, 4] = bad
    images = np.zeros((2, 4, 5, 6), np.float32)
    with pytest.raises(ValueError, match='labels must lie'):
        weighted_majority_vote(labels, images, images[0], 6, use_compiled=True)


def test_probseg_uint8_is_what_nibabel_writes(tmp_path):
    """FuseLabels writes ``probseg_uint8`` with slope 1/255: the bytes nibabel writes for the
    dense float probabilities (uint8 on disk, scale factor picked by nibabel)."""
    import nibabel as nib

    rng = np.random.default_rng(7)
    labels = np.zeros((3, 10, 9, 8), np.int16)
    labels[:, 2:8, 2:7, 2:6] = rng.integers(0, 4, size=(3, 6, 5, 4))
    images = rng.random((3, 10, 9, 8)).astype(np.float32)
    target = rng.random((10, 9, 8)).astype(np.float32)
    res = weighted_majority_vote(labels, images, target, 4)
    img = nib.Nifti1Image(np.moveaxis(res.dense(), 0, -1), np.eye(4))
    img.header.set_data_dtype(np.uint8)
    nib.save(img, tmp_path / 'float.nii.gz')
    img = nib.Nifti1Image(res.probseg_uint8(), np.eye(4))
    img.header.set_slope_inter(1.0 / 255, 0.0)
    nib.save(img, tmp_path / 'uint8.nii.gz')
    ref, new = (nib.load(tmp_path / f'{n}.nii.gz') for n in ('float', 'uint8'))
    assert new.get_data_dtype() == ref.get_data_dtype() == np.uint8
    assert (new.dataobj.slope, new.dataobj.inter) == (ref.dataobj.slope, ref.dataobj.inter)
    np.testing.assert_array_equal(new.dataobj.get_unscaled(), ref.dataobj.get_unscaled())


@needs_kernel
def test_kernel_equals_twin_on_real_library(assets_dir):
    """The three SUIT entries voting on the MNI152NLin2009cSymC entry's image (a real case)."""
    import nibabel as nib

    lib = assets_dir / 'suit'
    names = ['SUIT', 'MNI152NLin6AsymC', 'MNI152NLin2009cSymC']
    crop = (slice(85, 165), slice(45, 125), slice(55, 125))   # all 35 labels, 72k disagreeing
    labels = np.stack([np.asarray(nib.load(lib / f'entry-{n}_dseg.nii.gz').dataobj)[crop]
                       for n in names]).astype(np.int16)
    images = np.stack([np.asarray(nib.load(lib / f'entry-{n}_T1w.nii.gz').dataobj)[crop]
                       for n in names]).astype(np.float32)
    target = images[2] + 0.05 * np.random.default_rng(0).standard_normal(images[2].shape)
    ref_fused, ref_probs = weighted_majority_vote_numpy(labels, images, target, 35)
    res = weighted_majority_vote(labels, images, target, 35, use_compiled=True, num_threads=2)
    _assert_matches_twin(res, ref_fused, ref_probs)
    np.testing.assert_array_equal(res.index, _disagree(labels))
    top2 = np.sort(ref_probs, axis=0)[-2:]
    assert ((top2[1] - top2[0]) > 1e-4).mean() > 0.99


@pytest.mark.parametrize('use_compiled', [pytest.param(True, marks=needs_kernel), False])
def test_no_atlas_gives_background(use_compiled):
    res = weighted_majority_vote(np.zeros((0, 3, 4, 5), np.int16),
                                 np.zeros((0, 3, 4, 5), np.float32),
                                 np.zeros((3, 4, 5), np.float32), 3, use_compiled=use_compiled)
    assert np.all(res.fused == 0) and res.index.size == 0
    assert np.all(res.dense()[0] == 1.0)


def test_fuse_labels_interface(tmp_path):
    """FuseLabels end to end on small files: the fused dseg, and a 4D uint8 probseg (labels
    last, slope 1/255) identical to what nibabel writes for the dense float probabilities."""
    import nibabel as nib

    from cerebseg.interfaces.multiatlas import FuseLabels

    rng = np.random.default_rng(8)
    shape, aff = (12, 11, 10), np.diag([0.5, 0.5, 0.5, 1.0])
    labels = np.zeros((3,) + shape, np.int16)
    labels[:, 3:9, 2:8, 2:8] = rng.integers(0, 5, size=(3, 6, 6, 6))
    images = rng.random((3, 2) + shape).astype(np.float32)
    target = rng.random((2,) + shape).astype(np.float32)

    def save(arr, name):
        nib.save(nib.Nifti1Image(arr, aff), tmp_path / name)
        return str(tmp_path / name)

    res = FuseLabels(target_t1=save(target[0], 't1.nii.gz'),
                     target_t2=save(target[1], 't2.nii.gz'),
                     warped_t1=[save(images[k, 0], f'w{k}_t1.nii.gz') for k in range(3)],
                     warped_t2=[save(images[0, 1], 'w0_t2.nii.gz'), '', ''],
                     warped_dseg=[save(labels[k], f'w{k}_dseg.nii.gz') for k in range(3)],
                     n_labels=5, num_threads=2).run(cwd=str(tmp_path))
    available = np.array([[True, True], [True, False], [True, False]])
    ref_fused, ref_probs = weighted_majority_vote_numpy(labels, images, target, 5, available)
    dseg = nib.load(res.outputs.dseg)
    np.testing.assert_array_equal(np.asarray(dseg.dataobj), ref_fused)
    probseg = nib.load(res.outputs.probseg)
    assert probseg.shape == shape + (5,) and probseg.get_data_dtype() == np.uint8
    assert probseg.dataobj.slope == np.float32(1 / 255) and probseg.dataobj.inter == 0
    np.testing.assert_allclose(probseg.get_fdata(), np.moveaxis(ref_probs, 0, -1),
                               atol=0.5 / 255 + 1e-6)
    old = nib.Nifti1Image(np.moveaxis(ref_probs, 0, -1), aff)  # the probseg as written before
    old.header.set_data_dtype(np.uint8)
    nib.save(old, tmp_path / 'old.nii.gz')
    old = nib.load(tmp_path / 'old.nii.gz')
    np.testing.assert_array_equal(probseg.dataobj.get_unscaled(), old.dataobj.get_unscaled())
    # search=1: the non-local vote
    res = FuseLabels(target_t1=str(tmp_path / 't1.nii.gz'), target_t2=str(tmp_path / 't2.nii.gz'),
                     warped_t1=[str(tmp_path / f'w{k}_t1.nii.gz') for k in range(3)],
                     warped_t2=[str(tmp_path / 'w0_t2.nii.gz'), '', ''],
                     warped_dseg=[str(tmp_path / f'w{k}_dseg.nii.gz') for k in range(3)],
                     n_labels=5, search=1, num_threads=2).run(cwd=str(tmp_path))
    ref_fused, _ = weighted_majority_vote_numpy(labels, images, target, 5, available, search=1)
    np.testing.assert_array_equal(np.asarray(nib.load(res.outputs.dseg).dataobj), ref_fused)


def _brute_force_search(labels, images, target, n_labels, radius, search, beta=1.0, eps=1e-3):
    """Voxel-by-voxel evaluation of the non-local vote (the module docstring's formula)."""
    k_atlas = labels.shape[0]
    shape = target.shape
    rng = range(-search, search + 1)
    shifts = [(0, 0, 0)] + [(a, b, c) for a in rng for b in rng for c in rng
                            if (a, b, c) != (0, 0, 0)]

    def at(volume, point):
        return volume[tuple(min(max(p, 0), n - 1) for p, n in zip(point, shape))]

    cube = [(a, b, c) for a in range(-radius, radius + 1) for b in range(-radius, radius + 1)
            for c in range(-radius, radius + 1)]
    probs = np.zeros((n_labels,) + shape)
    for x in np.ndindex(shape):
        votes = []
        for k in range(k_atlas):
            best = None
            for d in shifts:
                msd = np.mean([
                    (at(target, np.add(x, o)) - at(images[k], np.add(np.clip(
                        np.add(x, o), 0, np.subtract(shape, 1)), d))) ** 2 for o in cube])
                if best is None or msd < best[0]:
                    best = (msd, at(labels[k], np.add(x, d)))
            votes.append(((best[0] + eps) ** -beta, best[1]))
        total = sum(w for w, _ in votes)
        for w, lab in votes:
            probs[(lab,) + x] += w / total
    return probs


SEARCH_IMPLEMENTATIONS = [pytest.param(weighted_majority_vote_numpy, id='numpy'),
                          pytest.param(_dense(True), id='compiled', marks=needs_kernel)]


@pytest.mark.parametrize('wmv', SEARCH_IMPLEMENTATIONS)
def test_search_matches_brute_force_formula(wmv):
    """The non-local vote: each atlas's best patch within one voxel, border clamped."""
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 4, size=(3, 6, 5, 5)).astype(np.int16)
    images = rng.random((3, 6, 5, 5)).astype(np.float32)
    target = rng.random((6, 5, 5)).astype(np.float32)
    fused, probs = wmv(labels, images, target, 4, radius=1, search=1)
    ref = _brute_force_search(labels, images, target, 4, radius=1, search=1)
    np.testing.assert_allclose(probs, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(fused, np.argmax(ref, axis=0))


@pytest.mark.parametrize('use_compiled', [pytest.param(True, marks=needs_kernel), False])
def test_search_follows_the_subjects_boundary(use_compiled):
    """Atlases whose anatomy (image and labels together) lies one voxel off the subject's, in
    different directions: local voting keeps their misplaced boundaries, the search puts the
    boundary where the subject's image has it (exactly, away from the border)."""
    rng = np.random.default_rng(3)
    shape = (20, 18, 16)
    truth = np.zeros(shape, np.int16)
    truth[4:16, 4:14, 3:13] = 1
    truth[4:16, 4:14, 8:13] = 2      # a boundary across z
    truth[10:16, 4:14, 3:13] = 3     # and one across x
    image = truth * 1.0 + 0.3 * np.sin(np.arange(shape[1]))[None, :, None]
    target = (image + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    offsets = [(1, 0, 0), (0, 0, -1), (-1, 0, 1)]
    labels = np.stack([np.roll(truth, d, axis=(0, 1, 2)) for d in offsets])
    images = np.stack([np.roll(image, d, axis=(0, 1, 2)) for d in offsets]).astype(np.float32)
    local = weighted_majority_vote(labels, images, target, 4, use_compiled=use_compiled)
    found = weighted_majority_vote(labels, images, target, 4, search=1,
                                   use_compiled=use_compiled)
    inner = (slice(2, -2),) * 3
    assert (local.fused[inner] != truth[inner]).sum() > 100
    np.testing.assert_array_equal(found.fused[inner], truth[inner])
    # voxels whose candidates all agree are left out of the compact result, with P = 1
    assert found.index.size < truth.size // 2
    np.testing.assert_array_equal(np.sort(found.index), found.index)


@needs_kernel
@pytest.mark.parametrize('seed,radius,search,beta', [(0, 2, 1, 1.0), (1, 1, 2, 2.0),
                                                    (2, 3, 1, 0.5)])
def test_search_kernel_equals_twin(seed, radius, search, beta):
    """Random labels in a box touching the volume border, two channels with a missing one, an
    x-gap of agreeing planes, any thread count."""
    rng = np.random.default_rng(seed)
    shape = (21, 15, 17)
    labels = np.zeros((4,) + shape, np.int16)
    labels[:, 2:18, 3:15, 0:12] = rng.integers(0, 6, size=(4, 16, 12, 12))
    labels[:, 9:13] = 2
    images = rng.random((4, 2) + shape).astype(np.float32)
    target = rng.random((2,) + shape).astype(np.float32)
    available = np.ones((4, 2), bool)
    available[2, 1] = False
    ref_fused, ref_probs = weighted_majority_vote_numpy(labels, images, target, 6, available,
                                                        radius, beta, search=search)
    for threads in (1, 2, 5):
        res = weighted_majority_vote(labels, images, target, 6, available, radius, beta,
                                     use_compiled=True, num_threads=threads, search=search)
        _assert_matches_twin(res, ref_fused, ref_probs)
        np.testing.assert_array_equal(res.index, np.flatnonzero(undecided(labels, search)))


@pytest.mark.parametrize('use_compiled', [False, pytest.param(True, marks=needs_kernel)])
@pytest.mark.parametrize('weight', [0.0, 0.3, 0.5, 1.0])
def test_mix_fusions_is_the_weighted_mean_of_the_dense_probabilities(use_compiled, weight):
    """mix_fusions of the local and the non-local vote equals the dense mixture (and the
    local / non-local vote itself at weight 0 / 1), most probable label first on ties."""
    from cerebseg.kernels.wmv import mix_fusions

    rng = np.random.default_rng(4)
    shape = (16, 14, 13)
    labels = np.zeros((3,) + shape, np.int16)
    labels[:, 3:13, 2:12, 2:11] = rng.integers(0, 5, size=(3, 10, 10, 9))
    labels[:, 6:9] = 3                       # planes where all agree: outside both indices
    images = rng.random((3,) + shape).astype(np.float32)
    target = rng.random(shape).astype(np.float32)
    local = weighted_majority_vote(labels, images, target, 5, use_compiled=use_compiled)
    nonlocal_ = weighted_majority_vote(labels, images, target, 5, search=1,
                                       use_compiled=use_compiled)
    mixed = mix_fusions(local, nonlocal_, weight)
    dense = (1 - weight) * local.dense() + weight * nonlocal_.dense()
    np.testing.assert_allclose(mixed.dense(), dense, atol=1e-6)
    ties = np.sort(dense, axis=0)[-1] - np.sort(dense, axis=0)[-2] < 1e-5
    np.testing.assert_array_equal(mixed.fused[~ties], dense.argmax(0)[~ties])
    assert mixed.index.size < labels[0].size  # agreeing voxels stay compact
    if weight in (0.0, 1.0):
        ref = local if weight == 0.0 else nonlocal_
        np.testing.assert_array_equal(mixed.fused[~ties], ref.fused[~ties])
    with pytest.raises(ValueError, match='weight'):
        mix_fusions(local, nonlocal_, 1.5)


def test_match_levels_moves_grey_and_white_onto_the_subjects():
    """The entry's medians over its grey and white labels become the subject's, zero stays
    zero, the map is monotone; an entry without white labels or with an inverted contrast is
    returned unchanged."""
    from cerebseg.kernels.wmv import match_levels

    rng = np.random.default_rng(0)
    labels = np.zeros((20, 20, 20), np.int16)
    labels[4:16, 4:16, 4:16] = 2               # grey
    labels[7:13, 7:13, 7:13] = 13              # white
    entry = np.where(labels == 13, 0.9, np.where(labels > 0, 0.5, 0.0)).astype(np.float32)
    entry += np.where(labels > 0, rng.normal(0, 0.02, labels.shape), 0).astype(np.float32)
    subject = np.where(labels == 13, 0.95, np.where(labels > 0, 0.8, 0.3)).astype(np.float32)
    out = match_levels(entry, labels, subject, [13])
    assert abs(np.median(out[labels == 2]) - 0.8) < 1e-3
    assert abs(np.median(out[labels == 13]) - 0.95) < 1e-3
    assert (out[labels == 0] == 0).all()
    grid = np.linspace(0, 1.2, 50, dtype=np.float32)
    mapped = match_levels(np.concatenate([entry.ravel(), grid]),
                          np.concatenate([labels.ravel(), np.zeros(50, np.int16)]),
                          np.concatenate([subject.ravel(), np.zeros(50, np.float32)]), [13])
    assert (np.diff(mapped[-50:]) > 0).all()
    np.testing.assert_array_equal(match_levels(entry, labels, subject, [99]), entry)
    np.testing.assert_array_equal(match_levels(1.0 - entry, labels, subject, [13]), 1.0 - entry)


def test_fuse_labels_interface_mixes_and_matches_levels(tmp_path):
    """FuseLabels with ``nonlocal_weight`` and ``white_labels``: the entries' levels matched to
    the subject's, then the local and non-local votes mixed, as the plain functions give;
    different from the unmatched non-local vote on these inputs."""
    import nibabel as nib

    from cerebseg.interfaces.multiatlas import FuseLabels
    from cerebseg.kernels.wmv import match_levels, mix_fusions

    rng = np.random.default_rng(3)
    shape, aff = (18, 17, 16), np.diag([0.5, 0.5, 0.5, 1.0])
    labels = np.zeros((3,) + shape, np.int16)
    labels[:, 3:15, 3:14, 3:13] = rng.integers(1, 3, size=(3, 12, 11, 10))
    labels[:, 6:12, 6:11, 6:10] = 3
    scale = np.array([0.6, 1.0, 1.4], np.float32)[:, None, None, None]
    images = (np.where(labels == 3, 0.9, np.where(labels > 0, 0.5, 0.1)) * scale
              + rng.normal(0, 0.05, labels.shape)).astype(np.float32)
    target = (np.where(labels[0] == 3, 0.95, np.where(labels[0] > 0, 0.75, 0.2))
              + rng.normal(0, 0.05, shape)).astype(np.float32)

    def save(arr, name):
        nib.save(nib.Nifti1Image(arr, aff), tmp_path / name)
        return str(tmp_path / name)

    paths = dict(target_t1=save(target, 't1.nii.gz'),
                 warped_t1=[save(images[k], f'w{k}_t1.nii.gz') for k in range(3)],
                 warped_t2=['', '', ''],
                 warped_dseg=[save(labels[k], f'w{k}_dseg.nii.gz') for k in range(3)])
    res = FuseLabels(**paths, n_labels=4, search=1, nonlocal_weight=0.5, white_labels=[3],
                     num_threads=2).run(cwd=str(tmp_path))
    got = np.asarray(nib.load(res.outputs.dseg).dataobj)
    matched = np.stack([match_levels(images[k], labels[k], target, [3]) for k in range(3)])
    ref = mix_fusions(weighted_majority_vote(labels, matched, target, 4),
                      weighted_majority_vote(labels, matched, target, 4, search=1), 0.5)
    np.testing.assert_array_equal(got, ref.fused)
    plain = weighted_majority_vote(labels, images, target, 4, search=1)
    assert (got != plain.fused).any()


@pytest.mark.parametrize('use_compiled', [False, pytest.param(True, marks=needs_kernel)])
def test_search_stays_local_where_an_entry_is_cropped(use_compiled):
    """Entries cut out of their image (0 beyond the labelled ball, as the cropped SUIT
    templates): a patch shifted inwards matches the subject's partial-volume edge better than
    the entry's own, and non-local voting grows the ball by a layer; searching only where the
    entry's image is defined leaves the edge where local voting puts it. Whole entries (CSF
    around the ball) are searched as before."""
    shape = (24, 24, 24)
    grid = np.indices(shape) - 11.5
    radius = np.sqrt((grid ** 2).sum(0))
    ball = radius < 7.0
    subject = np.clip(8.0 - radius, 0.0, 1.0) * 0.7 + 0.3        # tissue 1, CSF 0.3, soft edge
    labels = np.stack([ball, ball]).astype(np.int16)
    whole = np.stack([np.where(ball, 1.0, 0.3), np.where(ball, 0.95, 0.3)]).astype(np.float32)
    cropped = np.where(labels > 0, whole, 0.0).astype(np.float32)
    local = weighted_majority_vote(labels, cropped, subject, 2, use_compiled=use_compiled)
    grown = weighted_majority_vote(labels, cropped, subject, 2, search=1, where_defined=False,
                                   use_compiled=use_compiled)
    kept = weighted_majority_vote(labels, cropped, subject, 2, search=1,
                                  use_compiled=use_compiled)
    assert (grown.fused > 0).sum() > (local.fused > 0).sum() * 1.1
    np.testing.assert_array_equal(kept.fused, local.fused)
    np.testing.assert_array_equal(   # nothing cropped: the same vote either way
        weighted_majority_vote(labels, whole, subject, 2, search=1,
                               use_compiled=use_compiled).fused,
        weighted_majority_vote(labels, whole, subject, 2, search=1, where_defined=False,
                               use_compiled=use_compiled).fused)


@needs_kernel
def test_search_kernel_equals_twin_with_undefined_entry_voxels():
    """Entries with holes of zeros (undefined): kernel and twin restrict the search alike."""
    rng = np.random.default_rng(5)
    shape = (19, 16, 15)
    labels = np.zeros((3,) + shape, np.int16)
    labels[:, 2:17, 2:14, 1:13] = rng.integers(0, 4, size=(3, 15, 12, 12))
    images = rng.random((3,) + shape).astype(np.float32)
    images[0, :7] = 0.0
    images[2, :, 9:] = 0.0
    target = rng.random(shape).astype(np.float32)
    ref_fused, ref_probs = weighted_majority_vote_numpy(labels, images, target, 4, search=1)
    res = weighted_majority_vote(labels, images, target, 4, use_compiled=True, num_threads=2,
                                 search=1)
    _assert_matches_twin(res, ref_fused, ref_probs)
    free_fused, _ = weighted_majority_vote_numpy(labels, images, target, 4, search=1,
                                                 where_defined=False)
    assert (free_fused != ref_fused).any()
