"""Brainstem on its 1 mm box: the atlas label set registered onto the subject, or a trained 2D
network (one node each)."""
from __future__ import annotations

import os

from nipype.interfaces.base import BaseInterfaceInputSpec, File, TraitedSpec, traits

from cerebseg.interfaces.base import CerebsegInterface


class _AtlasInputSpec(BaseInterfaceInputSpec):
    t1_box = File(exists=True, mandatory=True, desc='subject T1w on the brainstem box')
    template_t1 = File(exists=True, mandatory=True, desc='label-set template T1w, same box')
    atlas_dseg = File(exists=True, mandatory=True, desc='label set on the same box')
    n_labels = traits.Int(mandatory=True, desc='number of labels including background')
    seed = traits.Int(0, usedefault=True, desc='random seed')
    settings = traits.Str('', usedefault=True,
                          desc='cerebseg version and registration settings '
                               '(cerebseg.models.registration.settings_fingerprint): hashed, so '
                               'that changed settings recompute this node')
    device = traits.Str('cpu', usedefault=True, nohash=True, desc='torch device')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='torch threads')


class _AtlasOutputSpec(TraitedSpec):
    dseg = File(exists=True, desc='labels on the brainstem box')
    probseg = File(exists=True, desc='label probabilities (4D uint8, labels last)')


def _save_box_result(results: dict, cwd: str, probs, dseg, affine) -> None:
    """Both nodes' outputs: the labels and the probabilities (4D uint8, labels last)."""
    import numpy as np

    from cerebseg.utils.images import atomic_save, to_label_image, to_probseg_image

    results['dseg'] = os.path.join(cwd, 'brainstem_dseg.nii.gz')
    atomic_save(to_label_image(dseg, affine), results['dseg'])
    results['probseg'] = os.path.join(cwd, 'brainstem_probseg.nii.gz')
    atomic_save(to_probseg_image(np.rint(np.moveaxis(probs, 0, -1) * 255), affine),
                results['probseg'])


class BrainstemAtlas(CerebsegInterface):
    """:func:`cerebseg.models.brainstem_methods.register_label_set` on the brainstem box."""

    input_spec = _AtlasInputSpec
    output_spec = _AtlasOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np
        import torch

        from cerebseg.models.brainstem_methods import register_label_set

        torch.set_num_threads(max(self.inputs.num_threads, 1))
        ref = nib.load(self.inputs.t1_box)
        template = nib.load(self.inputs.template_t1)
        atlas = nib.load(self.inputs.atlas_dseg)
        for img, what in ((template, 'template T1w'), (atlas, 'label set')):
            if img.shape != ref.shape or not np.allclose(img.affine, ref.affine, atol=1e-4):
                raise ValueError(f'The brainstem {what} {img.get_filename()} is not on the grid '
                                 f'of {self.inputs.t1_box}: rebuild the assets '
                                 '(cerebseg-assets build).')
        probs, dseg = register_label_set(
            np.asarray(ref.dataobj, np.float32), np.asarray(template.dataobj, np.float32),
            np.asarray(atlas.dataobj), self.inputs.n_labels,
            spacing=float(ref.header.get_zooms()[0]), seed=self.inputs.seed,
            device=self.inputs.device)
        _save_box_result(self._results, runtime.cwd, probs, dseg, ref.affine)
        return runtime


class _NetworkInputSpec(BaseInterfaceInputSpec):
    t1_box = File(exists=True, mandatory=True, desc='subject T1w on the brainstem box')
    weights = File(exists=True, mandatory=True, desc='2D brainstem network checkpoint')
    lut = File(exists=True, mandatory=True, desc='lookup table of the label set (TSV)')
    device = traits.Str('cpu', usedefault=True, nohash=True, desc='torch device')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='torch threads')


class BrainstemNetwork(CerebsegInterface):
    """:func:`cerebseg.models.brainstem_methods.segment_with_network` on the brainstem box."""

    input_spec = _NetworkInputSpec
    output_spec = _AtlasOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np
        import torch

        from cerebseg.models.brainstem_methods import segment_with_network
        from cerebseg.utils.native import read_lut_tsv

        torch.set_num_threads(max(self.inputs.num_threads, 1))
        ref = nib.load(self.inputs.t1_box)
        names = [r['name'] for r in read_lut_tsv(self.inputs.lut)]
        probs, dseg = segment_with_network(np.asarray(ref.dataobj, np.float32),
                                           self.inputs.weights, names,
                                           device=self.inputs.device)
        _save_box_result(self._results, runtime.cwd, probs, dseg, ref.affine)
        return runtime
