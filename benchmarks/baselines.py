"""The baselines users would otherwise run, on the folders of a cerebseg run: ANTs SyN with
``antsRegistrationSyN.sh``'s defaults (one atlas) and antsJointFusion of the ANTs-warped
library entries (``--registration ants``). Used by ``accuracy.py`` and ``volumes.py``."""
from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from cerebseg.workflows import workdir


def joint_fusion(reg_dir: Path, t1_box: Path, n_entries: int, margin_mm: float = 4.0,
                 keep=None):
    """antsJointFusion of the ANTs-warped entries (MapNode folders ``_register<k>``; ``keep``:
    the indices of the entries to fuse, all by default)."""
    import ants
    from scipy import ndimage

    target = nib.load(t1_box)
    folders = [reg_dir / 'mapflow' / f'_{workdir.REGISTER}{k}'
               for k in (range(n_entries) if keep is None else keep)]
    images = [np.asarray(nib.load(f / 'warped_T1w.nii.gz').dataobj, np.float32)
              for f in folders]
    labels = [np.asarray(nib.load(f / 'warped_dseg.nii.gz').dataobj) for f in folders]
    union = ndimage.binary_dilation(np.any(np.stack(labels) > 0, axis=0),
                                    iterations=int(margin_mm / 0.5))
    idx = np.argwhere(union)
    crop = tuple(slice(a, b + 1) for a, b in zip(idx.min(0), idx.max(0)))

    def img(a):
        return ants.from_numpy(np.ascontiguousarray(a[crop], np.float32))

    data = np.asarray(target.dataobj, np.float32)
    # ANTsPy writes the probability maps under mktemp names and leaves them: keep them in a
    # folder of our own
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory() as tmp:
        tempfile.tempdir = tmp
        try:
            jlf = ants.joint_label_fusion(img(data), img(union.astype(np.float32)),
                                          [img(a) for a in images],
                                          label_list=[img(lb) for lb in labels], rad=2,
                                          r_search=1, verbose=False)
            # antsJointFusion labels every voxel of the mask with a foreground label; the
            # background gets the probability the labels leave, and the most probable label wins
            probs = np.stack([p.numpy() for p in jlf['probabilityimages']])
        finally:
            tempfile.tempdir = saved
    values = np.asarray(jlf['segmentation_numbers'], np.int16)
    background = 1.0 - probs.sum(axis=0)
    best = np.argmax(probs, axis=0)
    fused = np.where(probs.max(axis=0) > background, values[best], 0)
    out = np.zeros(data.shape, np.int16)
    out[crop] = fused
    return out, target.affine


def syn_full(t1_box: Path, entry: dict, assets: Path, seed: int = 0) -> nib.Nifti1Image:
    """One library entry registered to the subject's working box by ANTs SyN with the
    ``antsRegistrationSyN.sh`` defaults (CC radius 2, 100x70x50x20 iterations at shrink factors
    8-4-2-1) at 1 mm, after cerebseg's field-of-view affine; its labels on the box grid.

    The stronger single-atlas baseline: cerebseg's own ANTs path runs a shorter SyN (MI,
    40x20x0) for speed.
    """
    import ants

    from cerebseg.utils.images import ants_to_nib, nib_to_ants
    from cerebseg.utils.registration import affine_fov_to, ants_seed, fov_mask_image

    fixed = nib_to_ants(nib.load(t1_box))
    moving = nib_to_ants(nib.load(assets / entry['files']['t1w']))
    labels = nib_to_ants(nib.load(assets / entry['files']['dseg']))
    mask = fov_mask_image(moving)
    one = (1.0, 1.0, 1.0)
    with tempfile.TemporaryDirectory() as tmp, ants_seed(seed):
        affine = affine_fov_to(fixed, moving, mask, tmp, seed)
        reg = ants.registration(ants.resample_image(fixed, one, False, 0),
                                ants.resample_image(moving, one, False, 0),
                                type_of_transform='antsRegistrationSyN[so]',
                                initial_transform=affine,
                                moving_mask=ants.resample_image(mask, one, False, 1),
                                outprefix=f'{tmp}/full_')
        warped = ants.apply_transforms(fixed, labels, reg['fwdtransforms'],
                                       interpolator='genericLabel')
    return ants_to_nib(warped)
