"""Torch registration of all library entries onto the subject, in one batch (CPU or GPU)."""
from __future__ import annotations

import os

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject,
                                    OutputMultiObject, TraitedSpec, traits)

from cerebseg.interfaces.base import CerebsegInterface


class _TorchRegisterInputSpec(BaseInterfaceInputSpec):
    target_t1 = File(exists=True, mandatory=True, desc='subject T1w on the working grid')
    entry_t1 = InputMultiObject(File(exists=True), mandatory=True,
                                desc='library entry T1w images (working grid)')
    entry_t2 = InputMultiObject(traits.Str, mandatory=True,
                                desc="library entry T2w images ('' where an entry has none)")
    entry_dseg = InputMultiObject(File(exists=True), mandatory=True,
                                  desc='library entry labels (working grid)')
    regnet = traits.Str('', usedefault=True,
                        desc='registration network checkpoint to initialise with (empty: none)')
    seed = traits.Int(0, usedefault=True, desc='torch random seed')
    control_mm = traits.Float(4.0, usedefault=True,
                              desc='control grid of the velocity field (mm; the label protocol '
                                   'chooses it)')
    settings = traits.Str('', usedefault=True,
                          desc='cerebseg version and registration settings '
                               '(cerebseg.models.registration.settings_fingerprint): hashed, so '
                               'that changed settings recompute this node')
    device = traits.Str('cpu', usedefault=True, nohash=True,
                        desc='torch device (resolved by cerebseg.models.inference)')
    use_gpu = traits.Bool(False, usedefault=True, nohash=True,
                          desc='runs on a GPU (nipype MultiProc queues GPU nodes)')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='torch CPU threads')


class _TorchRegisterOutputSpec(TraitedSpec):
    warped_t1 = OutputMultiObject(File(exists=True), desc='entry T1w warped to the subject')
    warped_t2 = OutputMultiObject(traits.Str, desc="entry T2w warped ('' where none)")
    warped_dseg = OutputMultiObject(File(exists=True), desc='entry labels warped to the subject')
    transforms = File(exists=True, desc='affines and velocity fields of every entry (.npz)')


class TorchRegisterEntries(CerebsegInterface):
    """Diffeomorphic SVF registration of ``K`` entries in one batch
    (:func:`cerebseg.models.registration.register_svf`, optionally started by the registration
    network). Images are warped trilinearly, labels by nearest neighbour.
    """

    input_spec = _TorchRegisterInputSpec
    output_spec = _TorchRegisterOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np
        import torch

        from cerebseg.models import registration as reg
        from cerebseg.utils.images import atomic_save, to_label_image

        torch.set_num_threads(max(self.inputs.num_threads, 1))
        device = self.inputs.device
        ref = nib.load(self.inputs.target_t1)
        spacing = float(ref.header.get_zooms()[0])
        fixed = np.asarray(ref.dataobj, np.float32)
        moving = np.stack([np.asarray(nib.load(p).dataobj, np.float32)
                           for p in self.inputs.entry_t1])
        init_velocity, config = None, reg.SVFConfig(control_mm=self.inputs.control_mm)
        if self.inputs.regnet:
            from cerebseg.models.checkpoint import load_regnet
            from cerebseg.models.regnet import predict_velocity

            net = load_regnet(self.inputs.regnet, device=device)
            init_velocity = predict_velocity(net, fixed, moving, spacing, device)
            config = reg.REFINE_CONFIG
        result = reg.register_svf(fixed, moving, spacing=spacing, config=config, device=device,
                                  init_velocity=init_velocity, seed=self.inputs.seed)
        self._results['transforms'] = os.path.join(runtime.cwd, 'entries_to_subject.npz')
        np.savez_compressed(self._results['transforms'], affine=result.affine,
                            velocity=result.velocity, spacing=result.spacing,
                            inverse=result.inverse, steps=result.steps)
        labels = [np.asarray(nib.load(p).dataobj, np.int16) for p in self.inputs.entry_dseg]
        t2s = [np.asarray(nib.load(p).dataobj, np.float32) if p else None
               for p in self.inputs.entry_t2]
        kinds = (('warped_t1', 'T1w', list(moving), 1), ('warped_dseg', 'dseg', labels, 0),
                 ('warped_t2', 'T2w', t2s, 1))
        warped = reg.apply_svf_many(result, [(vols, order) for _, _, vols, order in kinds],
                                    device=device)
        for (key, suffix, _, order), volumes in zip(kinds, warped):
            self._results[key] = []
            for k, data in enumerate(volumes):
                path = ''  # an entry without this image
                if data is not None:
                    path = os.path.join(runtime.cwd, f'entry{k}_warped_{suffix}.nii.gz')
                    atomic_save(nib.Nifti1Image(data, ref.affine) if order
                                else to_label_image(data, ref.affine), path)
                self._results[key].append(path)
        return runtime
