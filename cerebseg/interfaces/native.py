"""Interfaces that bring results back to the native T1w grid and measure them."""
from __future__ import annotations

import json
import logging
import os

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, TraitedSpec, isdefined,
                                    traits)

from cerebseg.interfaces.base import CerebsegInterface

LOGGER = logging.getLogger('cerebseg.interfaces.native')


class _NativeInputSpec(BaseInterfaceInputSpec):
    probseg = File(exists=True, mandatory=True, desc='4D label probabilities, working grid')
    reference = File(exists=True, mandatory=True, desc='the input T1w (defines the grid)')
    t1_to_mni = File(exists=True, mandatory=True, desc='T1w -> MNI affine (ANTs)')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='ITK/ANTs threads')
    foreground_first = traits.Bool(False, usedefault=True,
                                   desc='decide the outline first (one structure, many labels)')
    foreground = traits.Bool(False, usedefault=True,
                             desc='also write the probability of the structure (all labels)')


class _NativeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='labels on the exact grid of the input T1w')
    foreground = File(desc='probability of the structure on that grid (uint8 in 1/255 steps); '
                           'only with the input foreground')


class ProbsToNative(CerebsegInterface):
    """:func:`cerebseg.utils.native.probabilities_to_native` on the input T1w's grid."""

    input_spec = _NativeInputSpec
    output_spec = _NativeOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from cerebseg.utils.images import (atomic_save, nib_to_ants, to_label_image,
                                           to_probseg_image)
        from cerebseg.utils.native import probabilities_to_native
        from cerebseg.utils.registration import set_threads

        set_threads(self.inputs.num_threads)
        ref = nib.load(self.inputs.reference)
        ref3d = nib.Nifti1Image(np.zeros(ref.shape[:3], np.float32), ref.affine)
        result = probabilities_to_native(nib.load(self.inputs.probseg), nib_to_ants(ref3d),
                                         self.inputs.t1_to_mni,
                                         foreground_first=self.inputs.foreground_first,
                                         with_foreground=self.inputs.foreground)
        labels, whole = result if self.inputs.foreground else (result, None)
        self._results['out_file'] = os.path.join(runtime.cwd, 'native_dseg.nii.gz')
        atomic_save(to_label_image(labels, ref.affine), self._results['out_file'])
        if whole is not None:
            self._results['foreground'] = os.path.join(runtime.cwd, 'native_foreground.nii.gz')
            atomic_save(to_probseg_image(np.rint(whole * 255), ref.affine),
                        self._results['foreground'])
        return runtime


class _TrimInputSpec(BaseInterfaceInputSpec):
    dseg = File(exists=True, mandatory=True, desc='native-space labels')
    t1w = File(exists=True, mandatory=True,
               desc='the bias-corrected T1w on the same grid (the intensities judged)')
    foreground = File(exists=True, desc='the fused probability of the structure on the same '
                                        'grid: when given, the outline is grown too')
    # cerebseg.utils.outline.TRIM_DEPTH_MM (not imported here: no NumPy at import); an input,
    # so that a work folder of a cerebseg that trimmed otherwise runs this node again
    depth_mm = traits.Float(3.0, usedefault=True,
                            desc='how deep the trimming goes from the fused outline (mm)')


class _TrimOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='labels without the outline voxels that are mostly CSF')
    report = File(exists=True, desc='JSON (for the sidecar, key OutlineTrimming): the CSF '
                                    'and tissue levels, the voxels removed')


class TrimOutline(CerebsegInterface):
    """:func:`cerebseg.utils.outline.trim_outline` of native labels by the subject's T1w, or
    with ``foreground`` :func:`cerebseg.utils.outline.tissue_outline` (trimmed and grown)."""

    input_spec = _TrimInputSpec
    output_spec = _TrimOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from cerebseg.utils.images import atomic_save, atomic_write_text, to_label_image
        from cerebseg.utils.outline import tissue_outline, trim_outline, trim_passes

        seg = nib.load(self.inputs.dseg)
        passes = trim_passes(seg.header.get_zooms()[:3], self.inputs.depth_mm)
        t1w = nib.load(self.inputs.t1w)
        # the corrected T1w is the input's voxel array corrected voxel by voxel: same indices
        # (its header went through ITK, which may spell an oblique affine differently)
        image = np.asarray(t1w.dataobj, dtype=np.float32)
        if isdefined(self.inputs.foreground):
            foreground = np.asarray(nib.load(self.inputs.foreground).dataobj, np.float32)
            labels, info = tissue_outline(np.asarray(seg.dataobj), image, foreground,
                                          passes=passes)
        else:
            labels, info = trim_outline(np.asarray(seg.dataobj), image, passes=passes)
        if 'skipped' in info:
            LOGGER.warning(
                'Outline left as fused (%s): %s', info['skipped'], self.inputs.t1w)
        voxel_ml = float(np.prod(seg.header.get_zooms()[:3])) / 1000.0
        info['removed_ml'] = round(info['removed_voxels'] * voxel_ml, 3)
        if 'added_voxels' in info:
            info['added_ml'] = round(info['added_voxels'] * voxel_ml, 3)
        self._results['out_file'] = os.path.join(runtime.cwd, 'trimmed_dseg.nii.gz')
        atomic_save(to_label_image(labels, seg.affine), self._results['out_file'])
        self._results['report'] = os.path.join(runtime.cwd, 'outline.json')
        atomic_write_text(self._results['report'], json.dumps({'OutlineTrimming': info},
                                                              indent=1))
        return runtime


class _FieldOfViewInputSpec(BaseInterfaceInputSpec):
    label_maps = traits.List(File(exists=True), mandatory=True,
                             desc='label maps in MNI space (the library entries\' labels)')
    reference = File(exists=True, mandatory=True, desc='the input T1w (its field of view)')
    t1_to_mni = File(exists=True, mandatory=True, desc='T1w -> MNI affine (ANTs)')
    lut = File(exists=True, mandatory=True, desc='lookup table TSV (the labels\' names)')
    structure = traits.Str(mandatory=True, desc='what the labels are (for the warning)')
    # cerebseg.utils.native.MAX_OUTSIDE_IMAGE (no NumPy at import; a test ties the two)
    limit = traits.Float(0.02, usedefault=True,
                         desc='share of a label outside the image above which it is not '
                              'measured')


class _FieldOfViewOutputSpec(TraitedSpec):
    report = File(exists=True, desc='JSON (for the sidecar, key FieldOfView)')


class FieldOfView(CerebsegInterface):
    """:func:`cerebseg.utils.native.outside_image`: how much of each label lies beyond the
    input image's edge; a warning names the labels above the limit."""

    input_spec = _FieldOfViewInputSpec
    output_spec = _FieldOfViewOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from cerebseg.utils.images import atomic_write_text, nib_to_ants
        from cerebseg.utils.native import outside_image, outside_report, read_lut_tsv

        ref = nib.load(self.inputs.reference)
        ref3d = nib.Nifti1Image(np.zeros(ref.shape[:3], np.float32), ref.affine)
        lut = read_lut_tsv(self.inputs.lut)
        outside, total = outside_image([nib.load(f) for f in self.inputs.label_maps],
                                       nib_to_ants(ref3d), self.inputs.t1_to_mni,
                                       max(row['index'] for row in lut) + 1)
        info = outside_report(outside, total, lut, self.inputs.limit)
        if info['NotMeasured']:   # the whole's share is a mean of the labels': never above
            LOGGER.warning(
                'The image ends inside the %s: about %.1f %% of it lies outside %s (most: %s). '
                'The volumes of %d label(s) are written n/a (not measured); acquire or '
                'choose an image whose field of view covers the whole %s.',
                self.inputs.structure, 100 * info['WholeShareOutside'], self.inputs.reference,
                ', '.join(f"{n} {100 * info['ShareOutside'][n]:.0f} %"
                          for n in info['NotMeasured'][:3]),
                len(info['NotMeasured']), self.inputs.structure)
        self._results['report'] = os.path.join(runtime.cwd, 'field_of_view.json')
        atomic_write_text(self._results['report'], json.dumps({'FieldOfView': info}, indent=1))
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
    fov = File(exists=True, desc='JSON of FieldOfView: its NotMeasured labels are written n/a')


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
        lut = read_lut_tsv(self.inputs.lut)
        not_measured = ()
        if isdefined(self.inputs.fov):
            with open(self.inputs.fov, encoding='utf-8') as fobj:
                names = set(json.load(fobj)['FieldOfView']['NotMeasured'])
            not_measured = [row['index'] for row in lut if row['name'] in names]
        table = morph_table(np.asarray(img.dataobj), img.header.get_zooms()[:3], lut, icv_mm3,
                            uncertainty, summary, not_measured=not_measured)
        self._results['out_file'] = os.path.join(runtime.cwd, 'morph.tsv')
        atomic_write_text(self._results['out_file'], table)
        self._results['icv_file'] = os.path.join(runtime.cwd, 'icv.json')
        atomic_write_text(self._results['icv_file'], json.dumps(
            {'IntracranialVolume_mm3': round(icv_mm3, 1), 'AffineDeterminant': det}))
        return runtime
