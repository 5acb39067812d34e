"""Hostile NIfTI headers (property-based): each is refused with BadDataError (exit 65) and a
message naming the file; never another exception, a hang or a huge allocation; the file is
never modified. Then the command line on one file of each kind: exit 65, no label map."""
from __future__ import annotations

import gzip
import hashlib
import struct

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from cerebseg.errors import BadDataError
from cerebseg.utils.images import MAX_VOXELS, load_checked

SHAPE = (24, 22, 20)
# byte offsets in the NIfTI-1 header
DIM, PIXDIM, VOX_OFFSET = 40, 76, 108
QFORM_CODE, SFORM_CODE, QUATERN, SROW = 252, 254, 256, 280


def _valid_bytes() -> bytes:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, SHAPE).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.2, 1.0]))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img.to_bytes()


VALID = _valid_bytes()


def _put(raw: bytearray, offset: int, fmt: str, *values) -> None:
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack('<' + fmt, *values)


def _bad_dim(draw):
    dims = list(SHAPE)
    kind = draw(st.sampled_from(['ndim', 'zero', 'negative', 'huge', 'flat']))
    if kind == 'ndim':
        ndim = draw(st.sampled_from([0, -1, 1, 2, 8, 100, 32767]))
        return ('dim', ndim, dims)
    axis = draw(st.integers(0, 2))
    if kind == 'zero':
        dims[axis] = 0
    elif kind == 'negative':
        dims[axis] = draw(st.integers(-32768, -1))
    elif kind == 'huge':
        dims = [draw(st.integers(2000, 32767)) for _ in range(3)]
    else:
        dims[axis] = draw(st.integers(1, 15))
    return ('dim', 3, dims)


@st.composite
def hostile(draw):
    """(kind, the file's bytes, whether gzipped): one hostile change to a valid image."""
    raw = bytearray(VALID)
    kind = draw(st.sampled_from(['dim', 'pixdim', 'affine', 'qform_sform', 'vox_offset',
                                 'truncated', 'garbage', 'bomb']))
    if kind == 'dim':
        _, ndim, dims = _bad_dim(draw)
        _put(raw, DIM, '8h', ndim, *dims, 1, 1, 1, 1)
    elif kind == 'pixdim':
        axis = draw(st.integers(1, 3))
        value = draw(st.sampled_from([0.0, -1.0, float('nan'), float('inf'), 1e-9, 1e9, 50.0]))
        _put(raw, PIXDIM + 4 * axis, 'f', value)
        _put(raw, SFORM_CODE, 'h', 0)   # the affine comes from pixdim and the qform
    elif kind == 'affine':
        bad = draw(st.sampled_from(['singular', 'nan', 'inf']))
        rows = [[0.0] * 4] * 3 if bad == 'singular' else \
            [[float(bad), 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.2, 0.0]]
        _put(raw, QFORM_CODE, 'h', 0)
        for i, row in enumerate(rows):
            _put(raw, SROW + 16 * i, '4f', *row)
    elif kind == 'qform_sform':
        shift = draw(st.floats(2.0, 500.0)) * draw(st.sampled_from([-1, 1]))
        axis = draw(st.integers(0, 2))
        _put(raw, QUATERN + 12 + 4 * axis, 'f', shift)   # qoffset_x/y/z
    elif kind == 'vox_offset':
        value = draw(st.sampled_from([float(len(raw) + 8), 1e12, -352.0, float('nan'),
                                      float(len(raw) - 16), 0.0, 100.0]))
        _put(raw, VOX_OFFSET, 'f', value)
    elif kind == 'truncated':
        cut = draw(st.integers(0, len(raw) - 2))
        raw = raw[:cut]
    elif kind == 'garbage':
        raw = bytearray(draw(st.binary(min_size=0, max_size=2000)))
    else:   # a decompression bomb kept small: 64 MiB of zeros in ~65 kB, or a huge header
        hdr = nib.Nifti1Header()
        huge = draw(st.booleans())
        shape = (1024, 1024, 1024) if huge else (512, 512, 256)   # uint8: 64 MiB
        hdr.set_data_shape(shape)
        hdr.set_data_dtype(np.int16 if huge else np.uint8)
        hdr.set_zooms((1.0, 1.0, 1.0))
        hdr['vox_offset'] = 352
        head = hdr.binaryblock + b'\0' * 4
        body = gzip.compress(head + b'\0' * (64 * 2 ** 20 if not huge else 2 ** 20), 1)
        return kind, body, True
    gz = draw(st.booleans())
    return kind, gzip.compress(bytes(raw), 1) if gz else bytes(raw), gz


@settings(max_examples=80, deadline=20000, print_blob=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=hostile())
def test_hostile_header_is_refused(case, tmp_path_factory):
    kind, blob, gz = case
    note(f'{kind}, gzip={gz}, {len(blob)} bytes, header bytes 40-124: {blob[40:124].hex()}')
    path = tmp_path_factory.mktemp('hostile') / ('sub-01_T1w.nii.gz' if gz else 'sub-01_T1w.nii')
    path.write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    with pytest.raises(BadDataError) as info:
        load_checked(path, 'T1w')
    assert str(path) in str(info.value), (kind, str(info.value))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest   # never modified


def test_the_valid_image_itself_loads(tmp_path):
    path = tmp_path / 'ok.nii'
    path.write_bytes(VALID)
    assert load_checked(path).shape == SHAPE
    assert MAX_VOXELS < 1024 ** 3


def test_small_qform_sform_rounding_is_accepted(tmp_path):
    """Converters leave float32 rounding between qform and sform: not a disagreement."""
    raw = bytearray(VALID)
    _put(raw, QUATERN + 12, 'f', 0.01)
    path = tmp_path / 'ok.nii'
    path.write_bytes(bytes(raw))
    assert load_checked(path).shape == SHAPE


def _case_bytes(kind: str) -> bytes:
    raw = bytearray(VALID)
    if kind == 'dim':
        _put(raw, DIM, '8h', 3, 30000, 30000, 30000, 1, 1, 1, 1)
    elif kind == 'pixdim':
        _put(raw, PIXDIM + 4, 'f', float('nan'))
        _put(raw, SFORM_CODE, 'h', 0)
    elif kind == 'affine':
        _put(raw, QFORM_CODE, 'h', 0)
        for i in range(3):
            _put(raw, SROW + 16 * i, '4f', 0.0, 0.0, 0.0, 0.0)
    elif kind == 'qform_sform':
        _put(raw, QUATERN + 12, 'f', 40.0)
    elif kind == 'vox_offset':
        _put(raw, VOX_OFFSET, 'f', 1e12)
    elif kind == 'truncated':
        raw = raw[:len(raw) // 2]
    return gzip.compress(bytes(raw), 1)


@pytest.mark.parametrize('kind', ['dim', 'pixdim', 'affine', 'qform_sform', 'vox_offset',
                                  'truncated'])
def test_command_refuses_hostile_input(tmp_path, assets_dir, caplog, kind):
    """The whole command: exit 65 with the file named, no label map, the input untouched."""
    from cerebseg.bids_app.run import main
    from conftest import SUIT, make_bids

    bids = make_bids(tmp_path / 'bids', {'01': ['anat/sub-01_T1w.nii.gz']})
    t1w = bids / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'
    t1w.write_bytes(_case_bytes(kind))
    digest = hashlib.sha256(t1w.read_bytes()).hexdigest()
    out = tmp_path / 'out'
    code = main([str(bids), str(out), 'participant', '-w', str(tmp_path / 'work'),
                 '--assets-dir', str(assets_dir), *SUIT, '--skip-bids-validation'])
    assert code == 65, caplog.text
    assert str(t1w) in caplog.text
    assert not list(out.rglob('*_dseg.nii.gz'))
    assert hashlib.sha256(t1w.read_bytes()).hexdigest() == digest
