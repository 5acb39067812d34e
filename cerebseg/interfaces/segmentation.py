"""The DeepCeres cascade on the working grid (one node: both stages, all networks)."""
from __future__ import annotations

import os

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject,
                                    TraitedSpec, traits)

from cerebseg.interfaces.base import CerebsegInterface


class _CascadeInputSpec(BaseInterfaceInputSpec):
    t1_box = File(exists=True, mandatory=True, desc='T1w on the working grid')
    t2_box = traits.Str('', usedefault=True, desc="T2w on the working grid ('' for none)")
    prior = traits.Str('', usedefault=True,
                       desc="multi-atlas probabilities (4D uint8, labels last; '' for none)")
    hemisphere_weights = InputMultiObject(File(exists=True), mandatory=True,
                                          desc='hemisphere-stage checkpoints')
    hemisphere_inputs = traits.List(traits.Str, mandatory=True, desc='their input channels')
    lobule_weights = InputMultiObject(File(exists=True), mandatory=True,
                                      desc='lobule-stage checkpoints (ensembled)')
    lobule_inputs = traits.List(traits.Str, mandatory=True, desc='their input channels')
    lut = File(exists=True, mandatory=True, desc='lookup table of the label protocol')
    protocol = traits.Str(mandatory=True, desc='label protocol name (checked in checkpoints)')
    role = traits.Enum('labels', 'outline', usedefault=True,
                       desc='what the lobule networks decide: every label, or the outline '
                            '(the lobules from the prior); the weights manifest says')
    device = traits.Str('cpu', usedefault=True, nohash=True, desc='torch device')
    use_gpu = traits.Bool(False, usedefault=True, nohash=True,
                          desc='runs on a GPU (nipype MultiProc queues GPU nodes)')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='torch CPU threads')


class _CascadeOutputSpec(TraitedSpec):
    dseg = File(exists=True, desc='labels, working grid')
    probseg = File(exists=True, desc='ensemble probabilities (4D uint8, labels last)')
    uncertainty = File(exists=True, desc='voxelwise ensemble disagreement in [0, 1]')
    label_uncertainty = File(exists=True, desc='TSV: mean disagreement within each label')


class DeepCeresCascade(CerebsegInterface):
    """:func:`cerebseg.models.cascade.run_cascade` (hemisphere stage, then the lobule
    ensemble inside its mask) under ``torch.inference_mode``."""

    input_spec = _CascadeInputSpec
    output_spec = _CascadeOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np
        import torch

        from cerebseg.models.cascade import load_models, run_cascade
        from cerebseg.utils.images import (atomic_save, atomic_write_text, read_probseg,
                                           to_label_image, to_probseg_image)
        from cerebseg.utils.labels import read_lut
        from cerebseg.utils.memory import release_freed_memory

        release_freed_memory()   # what the worker's earlier nodes freed
        torch.set_num_threads(max(self.inputs.num_threads, 1))
        labels = read_lut(self.inputs.lut)
        device = self.inputs.device
        ref = nib.load(self.inputs.t1_box)
        t1 = np.asarray(ref.dataobj, np.float32)
        t2 = np.asarray(nib.load(self.inputs.t2_box).dataobj, np.float32) \
            if self.inputs.t2_box else None
        prior = read_probseg(self.inputs.prior) if self.inputs.prior else None
        common = {'protocol': self.inputs.protocol, 'device': device}
        hemi = load_models(self.inputs.hemisphere_weights, inputs=self.inputs.hemisphere_inputs,
                           stage='hemisphere', **common)
        lob = load_models(self.inputs.lobule_weights, inputs=self.inputs.lobule_inputs,
                          stage='lobules', labels=labels, lut=self.inputs.lut, **common)
        x_mm = ref.affine[0, 3] + ref.affine[0, 0] * np.arange(t1.shape[0])
        res = run_cascade(t1, labels=labels, x_mm=x_mm, hemisphere_models=hemi,
                          lobule_models=lob, t2=t2, prior=prior, device=device,
                          role=self.inputs.role)
        values = np.array([v for v, _ in labels])
        out = {k: os.path.join(runtime.cwd, f) for k, f in (
            ('dseg', 'cascade_dseg.nii.gz'), ('probseg', 'cascade_probseg.nii.gz'),
            ('uncertainty', 'cascade_uncertainty.nii.gz'),
            ('label_uncertainty', 'label_uncertainty.tsv'))}
        atomic_save(to_label_image(values[res.classes], ref.affine), out['dseg'])
        atomic_save(to_probseg_image(res.probseg, ref.affine), out['probseg'])
        atomic_save(nib.Nifti1Image(res.disagreement, ref.affine), out['uncertainty'])
        unc = res.label_uncertainty()
        rows = ['index\tname\tuncertainty'] + [
            f'{v}\t{n}\t{"n/a" if np.isnan(u) else f"{u:.6f}"}'
            for (v, n), u in zip(labels, unc) if v != 0]
        atomic_write_text(out['label_uncertainty'], '\n'.join(rows) + '\n')
        self._results.update(out)
        return runtime
