"""Input validation, atomic writes, nibabel <-> ANTs conversion."""
import nibabel as nib
import numpy as np
import pytest

from cerebseg.errors import BadDataError
from cerebseg.utils.grid import WORKING_GRID
from cerebseg.utils.images import (ants_affine, atomic_save, load_checked, nib_to_ants,
                                   sha256sum)

from conftest import make_bad_nifti, make_nifti


def test_valid_image_loads(tmp_path):
    img = load_checked(make_nifti(tmp_path / 'ok.nii.gz'))
    assert img.shape == (20, 20, 20)


def test_single_volume_4d_is_squeezed(tmp_path):
    img = load_checked(make_nifti(tmp_path / 'a.nii.gz', data=np.random.rand(20, 20, 20, 1)))
    assert img.shape == (20, 20, 20)


@pytest.mark.parametrize('case, match', [
    ('truncated', 'Cannot read'),
    ('notnifti', 'Cannot read'),
    ('2d', '2D'),
    ('4d', '4D'),
    ('nan', 'NaN'),
    ('voxel', 'voxel sizes'),
    ('constant', 'constant'),
    ('slab', 'slab'),
])
def test_bad_images_are_refused_with_the_file_name(tmp_path, case, match):
    path = make_bad_nifti(tmp_path / f'sub-01_{case}.nii.gz', case)
    with pytest.raises(BadDataError, match=match) as err:
        load_checked(path, 'T1w')
    assert str(path) in str(err.value)
    assert err.value.exit_code == 65


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / 'out.nii.gz'

    def boom(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(nib, 'save', boom)
    with pytest.raises(OSError):
        atomic_save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), target)
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_writes(tmp_path):
    target = atomic_save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)),
                         tmp_path / 'x.nii.gz')
    assert nib.load(target).shape == (4, 4, 4)
    assert len(sha256sum(target)) == 64


@pytest.mark.parametrize('affine', [
    np.diag([1.2, 0.9, 0.9, 1.0]),
    np.array([[-1.0, 0, 0, 90], [0, 1.0, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]]),
    np.array([[0, 0, -1.0, 10], [-1.0, 0, 0, 5], [0, 1.0, 0, -3], [0, 0, 0, 1]]),
])
def test_nib_ants_affine_roundtrip(affine):
    img = nib.Nifti1Image(np.random.rand(5, 6, 7).astype(np.float32), affine)
    aimg = nib_to_ants(img)
    np.testing.assert_allclose(ants_affine(aimg), affine, atol=1e-5)
    np.testing.assert_allclose(aimg.numpy(), img.get_fdata(), rtol=1e-6)


def test_ants_reads_our_conversion_like_nibabel(tmp_path):
    import ants

    affine = np.array([[-1.2, 0, 0, 90], [0, 0.94, 0, -120], [0, 0, 0.94, -82], [0, 0, 0, 1]])
    path = make_nifti(tmp_path / 'img.nii.gz', data=np.random.rand(8, 9, 10))
    img = nib.load(path)
    img = nib.Nifti1Image(img.get_fdata().astype(np.float32), affine)
    nib.save(img, path)
    from_disk = ants.image_read(str(path))
    ours = nib_to_ants(img)
    np.testing.assert_allclose(from_disk.origin, ours.origin, atol=1e-5)
    np.testing.assert_allclose(from_disk.direction, ours.direction, atol=1e-6)
    np.testing.assert_allclose(from_disk.spacing, ours.spacing, atol=1e-6)


def test_working_grid():
    assert WORKING_GRID.shape == (252, 180, 162)
    one = WORKING_GRID.at(1.0)
    assert one.shape == (126, 90, 81)
    # same physical box: the outer voxel edges coincide
    lo05 = np.array(WORKING_GRID.origin) - 0.25
    lo1 = np.array(one.origin) - 0.5
    np.testing.assert_allclose(lo05, lo1)
    assert WORKING_GRID.from_dict(WORKING_GRID.to_dict()) == WORKING_GRID


def _mirror_world(img):
    """Reference mirror about x = 0 by resampling every voxel centre (slow, exact at centres)."""
    from scipy import ndimage

    data = np.asarray(img.dataobj, np.float32)
    idx = np.indices(data.shape).reshape(3, -1)
    world = img.affine[:3, :3] @ idx + img.affine[:3, 3:]
    world[0] *= -1
    src = np.linalg.solve(img.affine[:3, :3], world - img.affine[:3, 3:])
    return ndimage.map_coordinates(data, src, order=1, mode='constant').reshape(data.shape)


@pytest.mark.parametrize('origin_x', [-9.0, -7.5])
def test_mirror_average_is_symmetric(origin_x):
    """Averaged with its mirror about x = 0: the result is its own mirror, on a grid that is
    symmetric about x = 0 (voxel flip) and on one that is not (resampled)."""
    from cerebseg.utils.images import mirror_average

    rng = np.random.default_rng(0)
    data = rng.random((19, 8, 6)).astype(np.float32)
    affine = np.diag([1.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (origin_x, -8, -6)
    img = nib.Nifti1Image(data, affine)
    out = mirror_average(img)
    np.testing.assert_allclose(out.affine, affine)
    sym = np.asarray(out.dataobj)
    # -7.5: x from -7.5 to 10.5, mirrored voxels exist for x up to 7.5 (index 15)
    inner = (slice(0, 16),) if origin_x == -7.5 else (slice(None),)
    np.testing.assert_allclose(sym[inner], _mirror_world(out)[inner], atol=1e-5)
    np.testing.assert_allclose(sym[inner], 0.5 * (data + _mirror_world(img))[inner], atol=1e-5)
    assert not np.allclose(data[inner], _mirror_world(img)[inner], atol=1e-2)
