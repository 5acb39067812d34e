"""Report figures (reportlets): load, reorient/resample, call one plotting function."""
from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, File, TraitedSpec, traits

from cerebseg.interfaces.base import CerebsegInterface


class _LabelMosaicInputSpec(BaseInterfaceInputSpec):
    anat_file = File(exists=True, mandatory=True, desc='anatomical image (the native T1w)')
    dseg_file = File(exists=True, mandatory=True, desc='label map on the same grid')
    lut_file = File(exists=True, mandatory=True, desc='lookup table TSV (index, name, color)')
    title = traits.Str(mandatory=True, desc='figure title')
    n_slices = traits.Int(7, usedefault=True, desc='slices per plane')


class _ReportOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc='the figure (SVG)')


class LabelMosaicRPT(CerebsegInterface):
    """Labels over the anatomy in three planes (:func:`cerebseg.utils.reports.plot_label_mosaic`)."""

    input_spec = _LabelMosaicInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        import os

        import nibabel as nib
        import numpy as np

        from cerebseg.utils.native import read_lut_tsv
        from cerebseg.utils.reports import plot_label_mosaic

        anat = nib.as_closest_canonical(nib.load(self.inputs.anat_file))
        dseg = nib.as_closest_canonical(nib.load(self.inputs.dseg_file))
        if not np.allclose(anat.affine, dseg.affine, atol=1e-3):
            raise ValueError(f'{self.inputs.dseg_file} is not on the grid of '
                             f'{self.inputs.anat_file}')
        out = os.path.join(runtime.cwd, 'labels.svg')
        plot_label_mosaic(np.asarray(anat.dataobj, np.float32).squeeze(),
                          np.asarray(dseg.dataobj).squeeze(), anat.header.get_zooms()[:3],
                          read_lut_tsv(self.inputs.lut_file), out, self.inputs.title,
                          n_slices=self.inputs.n_slices)
        self._results['out_report'] = out
        return runtime


class _FlickerInputSpec(BaseInterfaceInputSpec):
    fixed_file = File(exists=True, mandatory=True, desc='the reference image (its grid is used)')
    moving_file = File(exists=True, mandatory=True, desc='the registered image')
    transform = File(exists=True, mandatory=True, desc='ANTs transform, moving -> fixed')
    contour_file = File(exists=True, desc='mask on the fixed grid drawn on both frames')
    fixed_name = traits.Str(mandatory=True, desc='name of the fixed image in the figure')
    moving_name = traits.Str(mandatory=True, desc='name of the moving image in the figure')
    title = traits.Str(mandatory=True, desc='figure title')


class RegistrationRPT(CerebsegInterface):
    """Before/after flicker of a registration (:func:`cerebseg.utils.reports.plot_flicker`):
    the moving image resampled onto the fixed one through the fitted transform."""

    input_spec = _FlickerInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        import os

        import ants
        import nibabel as nib
        import numpy as np

        from cerebseg.utils.images import ants_to_nib, load_checked, nib_to_ants
        from cerebseg.utils.reports import plot_flicker

        fixed = load_checked(self.inputs.fixed_file, 'fixed image')
        moving = load_checked(self.inputs.moving_file, 'moving image')
        warped = ants.apply_transforms(fixed=nib_to_ants(fixed), moving=nib_to_ants(moving),
                                       transformlist=[self.inputs.transform],
                                       interpolator='linear')
        warped = nib.as_closest_canonical(ants_to_nib(warped))
        fixed = nib.as_closest_canonical(fixed)
        contour = None
        if self.inputs.contour_file:
            contour = np.asarray(nib.as_closest_canonical(
                nib.load(self.inputs.contour_file)).dataobj).squeeze() > 0
        out = os.path.join(runtime.cwd, 'flicker.svg')
        plot_flicker(np.asarray(fixed.dataobj, np.float32).squeeze(),
                     np.asarray(warped.dataobj, np.float32).squeeze(),
                     fixed.header.get_zooms()[:3], out, self.inputs.fixed_name,
                     self.inputs.moving_name, self.inputs.title, contour=contour,
                     roi=contour)
        self._results['out_report'] = out
        return runtime
