"""Interfaces that bring results back to the native T1w grid and measure them."""
from __future__ import annotations

import json
import os

from nipype.interfaces.base import BaseInterfaceInputSpec, File, TraitedSpec, traits

from cerebseg.interfaces.base import CerebsegInterface


class _NativeInputSpec(BaseInterfaceInputSpec):
    probseg = File(exists=True, mandatory=True, desc='4D label probabilities, working grid')
    reference = File(exists=True, mandatory=True, desc='the input T1w (defines the grid)')
    t1_to_mni = File(exists=True, mandatory=True, desc='T1w -> MNI affine (ANTs)')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='ITK/ANTs threads')
    foreground_first = traits.Bool(False, usedefault=True,
                                   desc='decide the outline first (one structure, many labels)')


class _NativeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='labels on the exact grid of the input T1w')


class ProbsToNative(CerebsegInterface):
    """:func:`cerebseg.utils.native.probabilities_to_native` on the input T1w's grid."""

    input_spec = _NativeInputSpec
    output_spec = _NativeOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from cerebseg.utils.images import atomic_save, nib_to_ants, to_label_image
        from cerebseg.utils.native import probabilities_to_native
        from cerebseg.utils.registration import set_threads

        set_threads(self.inputs.num_threads)
        ref = nib.load(self.inputs.reference)
        ref3d = nib.Nifti1Image(np.zeros(ref.shape[:3], np.float32), ref.affine)
        labels = probabilities_to_native(nib.load(self.inputs.probseg), nib_to_ants(ref3d),
                                         self.inputs.t1_to_mni,
                                         foreground_first=self.inputs.foreground_first)
        self._results['out_file'] = os.path.join(runtime.cwd, 'native_dseg.nii.gz')
        atomic_save(to_label_image(labels, ref.affine), self._results['out_file'])
        return runtime


class _VolumesInputSpec(BaseInterfaceInputSpec):
    dseg = File(exists=True, mandatory=True, desc='native-space labels')
    lut = File(exists=True, mandatory=True, desc='lookup table TSV')
    t1_to_mni = File(exists=True, mandatory=True,
                     desc='whole-brain T1w -> MNI affine (ANTs), for the ICV estimate')
    template_icv_ml = traits.Float(mandatory=True, desc='brain-mask volume of the template')
    uncertainty = traits.Str('', usedefault=True,
                             desc="TSV of per-label uncertainty to add as a column ('' none)")
    parts = traits.Bool(False, usedefault=True,
                        desc='append the brainstem part sums (the lookup table\'s part column)')


class _VolumesOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='morph TSV')
    icv_file = File(exists=True, desc='JSON with the intracranial volume estimate')


class LabelVolumes(CerebsegInterface):
    """Per-label volumes in native space, also as a fraction of an eTIV-style ICV estimate.

    ICV = (volume of the MNI152NLin2009cAsym brain mask) x |det(A)|, with A the linear part of
    the affine that maps template points into the native image (Buckner et al. 2004's
    atlas-scaling-factor idea, as in FreeSurfer's eTIV).
    """

    input_spec = _VolumesInputSpec
    output_spec = _VolumesOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from cerebseg.utils.images import atomic_write_text
        from cerebseg.utils.native import morph_table, read_lut_tsv
        from cerebseg.utils.registration import affine_determinant

        img = nib.load(self.inputs.dseg)
        det = abs(affine_determinant(self.inputs.t1_to_mni))
        icv_mm3 = self.inputs.template_icv_ml * 1000.0 * det
        uncertainty = None
        if self.inputs.uncertainty:
            uncertainty = {row['index']: row['uncertainty']
                           for row in read_lut_tsv(self.inputs.uncertainty)}
        summary = None
        if self.inputs.parts:
            from cerebseg.utils.brainstem_parts import part_rows as summary
        table = morph_table(np.asarray(img.dataobj), img.header.get_zooms()[:3],
                            read_lut_tsv(self.inputs.lut), icv_mm3, uncertainty, summary)
        self._results['out_file'] = os.path.join(runtime.cwd, 'morph.tsv')
        atomic_write_text(self._results['out_file'], table)
        self._results['icv_file'] = os.path.join(runtime.cwd, 'icv.json')
        atomic_write_text(self._results['icv_file'], json.dumps(
            {'IntracranialVolume_mm3': round(icv_mm3, 1), 'AffineDeterminant': det}))
        return runtime
