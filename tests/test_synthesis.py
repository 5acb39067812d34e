"""Images synthesised from manual lobule maps (issue 22): tissues from labels, layered sources
of exact-truth cases, and the manual maps themselves."""
import nibabel as nib
import numpy as np
import pytest

from cerebseg.utils.synthesis import (
    TissueLevels,
    ceres_from_manual,
    lobule_interfaces,
    paint,
    random_levels,
    recede,
    remap_contrast,
    tissue_fractions,
)
from cerebseg.utils.truth import CaseSpec, make_case


def test_manual_values_to_ceres_indices():
    data = np.array([0, 1, 13, 101, 113, 114, 221, 7.0000001])
    assert ceres_from_manual(data).tolist() == [0, 1, 13, 14, 26, 0, 0, 7]
    # the integers a MINC2 map is read as (uint8, uint16): same indices, no float copy
    for dtype in (np.uint8, np.uint16):
        assert ceres_from_manual(np.array([0, 1, 13, 101, 113, 114, 221, 7], dtype)).tolist() \
            == [0, 1, 13, 14, 26, 0, 0, 7]
    assert ceres_from_manual(np.array([-3.0, 255.0])).tolist() == [0, 0]


def _two_lobules():
    """Two lobules (1, 2) touching along a plane, a corpus medullare (13) under them, a sulcus
    (unlabelled slot) cut into lobule 1: 0.25 mm voxels."""
    lab = np.zeros((40, 40, 40), np.int16)
    lab[8:32, 8:20, 8:32] = 1
    lab[8:32, 20:32, 8:32] = 2
    lab[8:32, 8:32, 8:14] = 13
    lab[18:20, 8:16, 14:32] = 0          # a sulcus: 0.5 mm wide, 2 mm deep
    return lab


def test_tissues_follow_the_labels():
    lab = _two_lobules()
    zooms = (0.25,) * 3
    frac, inside = tissue_fractions(lab, zooms, cortex_mm=1.0, fissure_csf=0.4)
    total = frac.sum(0)
    assert np.allclose(total[inside], 1.0) and np.all(total[~inside] == 0)
    gm, wm, csf = frac
    # the sulcus is CSF inside the envelope, and is lined with grey matter
    assert inside[18, 10, 20] and csf[18, 10, 20] == 1
    assert gm[17, 10, 20] == 1 and gm[20, 10, 20] == 1
    # the corpus medullare is white matter, the lobules' cores too, their surfaces grey
    assert wm[20, 20, 10] == 1 and wm[24, 12, 24] == 1
    assert gm[8, 12, 24] == 1 and gm[24, 12, 31] == 1
    # the fissure between the lobules: a CSF share on both banks, cortex behind them
    banks = lobule_interfaces(lab)
    assert banks[24, 19, 24] and banks[24, 20, 24] and not banks[24, 17, 24]
    assert csf[24, 19, 24] == pytest.approx(0.4) and gm[24, 19, 24] == pytest.approx(0.6)
    assert gm[24, 17, 24] == 1
    # nothing is grey matter along the corpus medullare's border with a lobule, nor where a
    # lobule's two sides meet at the midline (the vermis is one piece)
    assert not banks[24, 12, 14]
    split = lab.copy()
    split[:20][split[:20] == 1] = 14                 # the same lobule, the other side
    assert split[19, 17, 24] == 14 and split[20, 17, 24] == 1
    assert not lobule_interfaces(split)[19, 17, 24]
    assert lobule_interfaces(split)[19, 19, 24]      # still a fissure with lobule 2
    img = paint(frac, inside, TissueLevels(gm=600, wm=1000, csf=200))
    assert np.isnan(img[0, 0, 0]) and img[20, 20, 10] == 1000 and img[18, 10, 20] == 200
    assert img[24, 19, 24] == pytest.approx(0.6 * 600 + 0.4 * 200)


def test_atrophy_recedes_the_surface_and_widens_the_fissures():
    """``recede``: lobule voxels within the distance of the surface facing CSF (the outside, a
    sulcus, the banks of a fissure without a gap) unlabelled; the corpus medullare and the
    lobules' cores kept; painted, the lost voxels are CSF; 0 mm changes nothing."""
    lab = _two_lobules()
    zooms = (0.25,) * 3
    np.testing.assert_array_equal(recede(lab, zooms, 0.0), lab)
    out = recede(lab, zooms, 0.4)   # centres 0.125 and 0.375 mm deep: 2 layers of 0.25 mm
    assert out[8, 12, 24] == 0 and out[9, 12, 24] == 0 and out[10, 12, 24] == 1    # outside
    assert out[24, 19, 24] == 0 and out[24, 18, 24] == 0 and out[24, 17, 24] == 1  # fissure
    assert out[24, 20, 24] == 0 and out[24, 21, 24] == 0 and out[24, 22, 24] == 2
    assert out[17, 10, 20] == 0 and out[16, 10, 20] == 0 and out[15, 10, 20] == 1  # sulcus
    assert np.array_equal(out == 13, lab == 13)                   # corpus medullare kept
    assert out[24, 12, 24] == 1 and out[24, 26, 24] == 2          # cores kept
    assert set(np.unique(out)) == {0, 1, 2, 13}
    deeper = recede(lab, zooms, 0.8)
    assert (deeper > 0).sum() < (out > 0).sum() < (lab > 0).sum()
    frac, inside = tissue_fractions(out, zooms)
    assert inside[24, 19, 24] and frac[2][24, 19, 24] == 1       # the fissure: CSF now


def test_random_levels_keep_the_tissue_order():
    rng = np.random.default_rng(0)
    ref = TissueLevels(gm=700, wm=1040, csf=250)
    for _ in range(100):
        lv = random_levels(rng, ref, spread=0.3)
        assert lv.csf < lv.gm < lv.wm


def test_remap_contrast_maps_levels_and_their_mixes():
    """A T1w-like image to a T2w-like one: each tissue level to its target, a mix of two
    neighbouring levels to the same mix of theirs, zero to zero; equal levels refused."""
    t1 = TissueLevels(gm=700, wm=1000, csf=300)
    t2 = TissueLevels(gm=560, wm=400, csf=1000)
    image = np.array([0, 300, 700, 1000, 0.5 * 300 + 0.5 * 700, 0.25 * 700 + 0.75 * 1000,
                      1500], np.float32)
    out = remap_contrast(image, t1, t2)
    assert out.dtype == np.float32
    assert out.tolist() == pytest.approx([0, 1000, 560, 400, 0.5 * 1000 + 0.5 * 560,
                                          0.25 * 560 + 0.75 * 400, 400])
    with pytest.raises(ValueError, match='levels must differ'):
        remap_contrast(image, TissueLevels(gm=700, wm=700, csf=300), t2)


def test_layered_sources_read_the_finest_first():
    """A case's image reads the first layer whose grid holds the point: a fine detail over a
    coarse base, the base's foreground setting the field of view."""
    base = nib.Nifti1Image(np.full((40, 40, 40), 100, np.float32), np.eye(4))
    fine = np.diag([0.5, 0.5, 0.5, 1.0])
    fine[:3, 3] = 15.0
    detail = nib.Nifti1Image(np.full((20, 20, 20), 300, np.float32), fine)
    lab = np.zeros((24, 24, 24), np.int16)
    lab[2:22, 2:22, 2:22] = 1                       # the 10 mm cube 14.75-24.75 mm
    fine_lab = fine.copy()
    fine_lab[:3, 3] = 14.0
    labels = nib.Nifti1Image(lab, fine_lab)
    spec = CaseSpec(max_rotation_deg=0, scale_range=(1, 1), max_shift_mm=0,
                    max_displacement_mm=0, bias_amplitude=0, gamma_range=(1, 1),
                    noise_fraction=0, margin_mm=0)
    case = make_case([detail, base], labels, seed=0, n_labels=2, spec=spec,
                     grid=((1.0, 1.0, 1.0), ('R', 'A', 'S')))
    assert case.t1w.shape == (40, 40, 40)
    centre, corner = case.t1w[20, 20, 20], case.t1w[5, 5, 5]
    assert centre == pytest.approx(3 * corner, rel=0.01)
    assert case.volumes_mm3[1] == pytest.approx(10 ** 3, rel=0.01)


@pytest.mark.integration
def test_library_sources_are_listed_with_their_checksums(shared_data):
    """`cerebseg-assets fetch` downloads what `build` reads: every file of every library entry
    (the manual maps included) is in sources.json, with the sha256 of the shared copy."""
    from cerebseg.assets import available_protocols, package_json
    from cerebseg.utils.images import sha256sum

    listed = {f['path']: f['sha256'] for f in package_json('sources.json')['files']}
    for name in available_protocols():
        protocol = package_json(f'protocols/{name}.json')
        for entry in protocol['entries']:
            for key in ('t1w', 't2w', 'dseg', 'manual'):
                if entry.get(key):
                    assert entry[key] in listed, f'{name}/{entry["name"]}: {entry[key]}'
                    assert sha256sum(shared_data / entry[key]) == listed[entry[key]]
