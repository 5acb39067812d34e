"""Preprocessing interfaces: validation, bias correction and denoising, MNI affine, T2w->T1w."""
from __future__ import annotations

import json
import logging
import os

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject,
                                    TraitedSpec, traits)
from nipype.utils.filemanip import fname_presuffix

from cerebseg.interfaces.base import CerebsegInterface

LOGGER = logging.getLogger('cerebseg.interfaces.preproc')


class _ThreadedInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='ITK/ANTs threads')
    seed = traits.Int(0, usedefault=True, desc='random seed of the ANTs samplers')


class _RegistrationInputSpec(_ThreadedInputSpec):
    reproducible = traits.Bool(True, usedefault=True, nohash=True,
                               desc='run ANTs single-threaded (bit-reproducible); else with '
                                    'num_threads threads')


def _run_registration(interface, runtime):
    """The child-process side of :class:`_IsolatedRegistration`."""
    interface._run_registration(runtime)
    return interface._results


class _IsolatedRegistration(CerebsegInterface):
    """An ANTs registration run in a fresh process (:mod:`cerebseg.utils.isolate`), where its
    thread count takes effect: one thread when ``reproducible`` (ANTs' multi-threaded metric
    is not reproducible run to run), else ``num_threads``. Subclasses implement
    ``_run_registration(runtime)`` as they would ``_run_interface``."""

    def _run_interface(self, runtime):
        from cerebseg.utils.isolate import call_in_fresh_process

        threads = 1 if self.inputs.reproducible else self.inputs.num_threads
        self._results.update(call_in_fresh_process(_run_registration, self, runtime,
                                                   threads=threads))
        return runtime


class _CorrectInputSpec(_ThreadedInputSpec):
    in_file = File(exists=True, mandatory=True, desc='anatomical image (T1w or T2w)')
    role = traits.Str('T1w', usedefault=True, desc='what the image is, for error messages')


class _CorrectOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='bias-corrected image, native grid')
    skull_stripped = traits.Bool(desc='whether the input looks brain-extracted')


class ValidateAndCorrect(CerebsegInterface):
    """Check an input image (clear error on bad data), then N4-correct it in native space."""

    input_spec = _CorrectInputSpec
    output_spec = _CorrectOutputSpec

    def _run_interface(self, runtime):
        import ants
        import numpy as np

        from cerebseg.utils.images import ants_to_nib, atomic_save, load_checked, nib_to_ants
        from cerebseg.utils.preproc import bias_correct, is_skull_stripped
        from cerebseg.utils.registration import set_threads

        set_threads(self.inputs.num_threads)
        img = load_checked(self.inputs.in_file, self.inputs.role)
        data = np.asarray(img.dataobj)
        stripped = is_skull_stripped(data, img.header.get_zooms()[:3])
        aimg = nib_to_ants(img)
        mask = (aimg > 0).astype('float32') if stripped else ants.get_mask(aimg)
        out = bias_correct(aimg, mask=mask)
        if stripped:
            out = out * mask
        self._results['out_file'] = fname_presuffix(self.inputs.in_file, suffix='_corrected',
                                                    newpath=runtime.cwd)
        atomic_save(ants_to_nib(out), self._results['out_file'])
        self._results['skull_stripped'] = bool(stripped)
        return runtime


class _MNIAffineInputSpec(_RegistrationInputSpec):
    in_file = File(exists=True, mandatory=True, desc='bias-corrected T1w, native grid')
    source_file = traits.Str(mandatory=True, desc='the input T1w (for error messages)')
    skull_stripped = traits.Bool(mandatory=True, desc='input is brain-extracted')
    template_head = File(exists=True, mandatory=True, desc='MNI152NLin2009cAsym whole head')
    template_brain = File(exists=True, mandatory=True, desc='MNI152NLin2009cAsym brain')
    template_mask = File(exists=True, mandatory=True, desc='MNI152NLin2009cAsym brain mask')
    min_correlation = traits.Float(mandatory=True, desc='refuse fits correlating less than this')
    symmetric = traits.Bool(True, usedefault=True,
                            desc='fit the T1w and its world mirror and average the two '
                                 '(a mirrored input gets exactly the mirrored transform)')
    coarse = traits.Bool(False, usedefault=True,
                         desc='one start (affine) on 4 mm copies instead of two on 2 mm '
                              '(--affine-fit coarse: tests of the pipeline, not for volumes)')


class _MNIAffineOutputSpec(TraitedSpec):
    transform = File(exists=True, desc='ANTs affine, T1w -> MNI152NLin2009cAsym')
    qc_file = File(exists=True, desc='JSON with the fit quality')


def _fit_plan(inputs):
    """How :class:`MNIAffine` and :class:`BoxAffine` run their fits: the template (brain for a
    skull-stripped input, else head), ANTs threads per fit, fits at once (two single-threaded
    fits when ``reproducible``, else one with ``num_threads``), and the sides fitted (the T1w,
    and its mirror when ``symmetric``)."""
    template = inputs.template_brain if inputs.skull_stripped else inputs.template_head
    if inputs.reproducible:
        threads, workers = 1, min(2, max(inputs.num_threads, 1))
    else:
        threads, workers = inputs.num_threads, 1
    return template, threads, workers, ((False, True) if inputs.symmetric else (False,))


def _mni_affine_start(in_file: str, template: str, template_mask: str, candidate: str,
                      out_prefix: str, seed: int, mirrored: bool = False, spacing: float = 2.0):
    """One start of the MNI affine, from files (run in a child process by :class:`MNIAffine`);
    with ``mirrored``, of the image's world mirror."""
    import nibabel as nib
    import numpy as np

    from cerebseg.utils.images import mirror_average, mirror_world, nib_to_ants
    from cerebseg.utils.registration import affine_start

    image = nib.load(in_file)
    return affine_start(nib_to_ants(mirror_world(image) if mirrored else image),
                        nib_to_ants(mirror_average(nib.load(template))),
                        np.asarray(mirror_average(nib.load(template_mask)).dataobj) > 0.25,
                        candidate, out_prefix, seed=seed, spacing=spacing)


class MNIAffine(CerebsegInterface):
    """Affine registration to MNI152NLin2009cAsym with a quality gate (bad fit -> exit 65).

    The target is the template averaged with its left-right mirror
    (:func:`cerebseg.utils.images.mirror_average`). With ``symmetric`` (the default) the T1w and
    its world mirror are both fitted and the two fits averaged
    (:func:`cerebseg.utils.registration.combine_mirror_fits`): a mirrored input gets exactly the
    mirrored transform, where two single fits differed by up to 1 mm (issue 22). The starts of
    :func:`cerebseg.utils.registration.affine_to_template` (two per image) run in child
    processes: two at once, one ANTs thread each when ``reproducible`` (the node uses
    ``min(2, num_threads)`` cores), else one after the other with ``num_threads`` threads.
    """

    input_spec = _MNIAffineInputSpec
    output_spec = _MNIAffineOutputSpec

    def _run_interface(self, runtime):
        import shutil
        from concurrent.futures import ThreadPoolExecutor

        from cerebseg.errors import BadDataError
        from cerebseg.utils.isolate import call_in_fresh_process
        from cerebseg.utils.registration import (AFFINE_STARTS, COARSE_AFFINE_START,
                                                 best_affine, combine_mirror_fits)

        template, threads, workers, sides = _fit_plan(self.inputs)
        starts, spacing = ((COARSE_AFFINE_START,), 4.0) if self.inputs.coarse \
            else (AFFINE_STARTS, 2.0)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = {mirrored: [pool.submit(
                call_in_fresh_process, _mni_affine_start, self.inputs.in_file, template,
                self.inputs.template_mask, candidate,
                os.path.join(runtime.cwd, f'T1w{"_mirror" * mirrored}_to_MNI_{candidate}_'),
                self.inputs.seed, mirrored, spacing, threads=threads) for candidate in starts]
                for mirrored in sides}
            best = {mirrored: best_affine([job.result() for job in side])
                    for mirrored, side in jobs.items()}
        transform = os.path.join(runtime.cwd, 'T1w_to_MNI_0.mat')
        if self.inputs.symmetric:
            fit = combine_mirror_fits(best[False], best[True], transform)
        else:
            fit = best[False]
            shutil.copyfile(fit.transform, transform)
        qc = {'TemplateFitCorrelation': round(fit.correlation, 4),
              'TemplateFitMinimum': self.inputs.min_correlation,
              'TemplateFitStart': fit.candidate,
              'InputSkullStripped': bool(self.inputs.skull_stripped)}
        if fit.mirror_distance_mm is not None:    # --affine-fit single: one fit, no distance
            qc['TemplateFitMirrorDistanceMM'] = round(fit.mirror_distance_mm, 3)
        self._results['qc_file'] = os.path.join(runtime.cwd, 'mni_affine_qc.json')
        with open(self._results['qc_file'], 'w') as fobj:
            json.dump(qc, fobj, indent=2)
        if fit.correlation < self.inputs.min_correlation:
            raise BadDataError(
                f'{self.inputs.source_file} does not fit the MNI152NLin2009cAsym template: after '
                f'affine registration its correlation with the template inside the brain is '
                f'{fit.correlation:.3f} (human T1w scans give 0.45 to 0.6; the minimum is '
                f'{self.inputs.min_correlation}). The image is not a T1-weighted human head or '
                'brain scan, or it is badly corrupted (wrong orientation in the header, heavy '
                'artefacts). cerebseg will not segment it; check the image.')
        self._results['transform'] = transform
        return runtime


class _BoxAffineInputSpec(_RegistrationInputSpec):
    in_file = File(exists=True, mandatory=True, desc='bias-corrected T1w, native grid')
    initial = File(exists=True, mandatory=True, desc='whole-brain affine T1w -> MNI (ANTs)')
    skull_stripped = traits.Bool(mandatory=True, desc='input is brain-extracted')
    template_head = File(exists=True, mandatory=True, desc='MNI152NLin2009cAsym whole head')
    template_brain = File(exists=True, mandatory=True, desc='MNI152NLin2009cAsym brain')
    entry_dseg = InputMultiObject(File(exists=True), mandatory=True,
                                  desc='library entry labels (working grid): the fit region')
    grid = traits.Dict(mandatory=True, desc='working grid (BoxGrid.to_dict())')
    margin_mm = traits.Float(5.0, usedefault=True, desc='dilation of the labels (mm)')
    symmetric = traits.Bool(True, usedefault=True,
                            desc='refine the T1w and its world mirror and average the two')


class _BoxAffineOutputSpec(TraitedSpec):
    transform = File(exists=True, desc='ANTs affine, T1w -> MNI152NLin2009cAsym (box fit)')


def _refine_box(in_file: str, template: str, entry_dseg: list[str], grid: dict, initial: str,
                out_prefix: str, margin_mm: float, seed: int, mirrored: bool) -> str:
    """One refinement of :class:`BoxAffine`, from files (run in a child process)."""
    import nibabel as nib
    import numpy as np

    from cerebseg.utils.grid import BoxGrid
    from cerebseg.utils.images import mirror_average, nib_to_ants
    from cerebseg.utils.registration import refine_to_box

    return refine_to_box(nib_to_ants(nib.load(in_file)),
                         nib_to_ants(mirror_average(nib.load(template))),
                         [np.asarray(nib.load(p).dataobj) for p in entry_dseg],
                         BoxGrid.from_dict(grid), initial, out_prefix, margin_mm=margin_mm,
                         seed=seed, mirrored=mirrored)


class BoxAffine(CerebsegInterface):
    """The MNI affine refined on cerebellum and brainstem
    (:func:`cerebseg.utils.registration.refine_to_box`), on the mirror-averaged template.

    With ``symmetric`` (the default) the T1w's world mirror is refined too, from the mirrored
    initial transform, and the two are averaged
    (:func:`cerebseg.utils.registration.average_mirror_fits`), so that the refinement keeps the
    MNI affine's mirror equivariance. The refinements run in child processes (one ANTs thread
    each and two at once when ``reproducible``, else one after the other with ``num_threads``).
    """

    input_spec = _BoxAffineInputSpec
    output_spec = _BoxAffineOutputSpec

    def _run_interface(self, runtime):
        from concurrent.futures import ThreadPoolExecutor

        from cerebseg.utils.isolate import call_in_fresh_process
        from cerebseg.utils.registration import MIRROR_FIT_TOLERANCE_MM, average_mirror_fits

        template, threads, workers, sides = _fit_plan(self.inputs)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = [pool.submit(call_in_fresh_process, _refine_box, self.inputs.in_file,
                                template, list(self.inputs.entry_dseg), self.inputs.grid,
                                self.inputs.initial,
                                os.path.join(runtime.cwd, f'T1w{"_mirror" * m}_fit_to_box_'),
                                self.inputs.margin_mm, self.inputs.seed, m, threads=threads)
                    for m in sides]
            fits = [job.result() for job in jobs]
        if not self.inputs.symmetric:
            self._results['transform'] = fits[0]
            return runtime
        transform = os.path.join(runtime.cwd, 'T1w_to_box_0.mat')
        distance = average_mirror_fits(fits[0], fits[1], transform)
        log = LOGGER.warning if distance > MIRROR_FIT_TOLERANCE_MM else LOGGER.info
        log('Box affine of the T1w and of its mirror: %.2f mm apart in the posterior fossa '
            '(averaged)', distance)
        self._results['transform'] = transform
        return runtime


class _T2InputSpec(_RegistrationInputSpec):
    t1_file = File(exists=True, mandatory=True, desc='bias-corrected T1w, native grid')
    t2_file = File(exists=True, mandatory=True, desc='bias-corrected T2w, its own grid')
    source_file = traits.Str(mandatory=True, desc='the input T2w (for error messages)')
    min_correlation = traits.Float(mandatory=True, desc='refuse fits correlating less than this')


class _T2OutputSpec(TraitedSpec):
    transform = File(exists=True, desc='ANTs rigid, T2w -> T1w')
    qc_file = File(exists=True, desc='JSON with the fit quality')


class CoregisterT2(_IsolatedRegistration):
    """Rigid registration of the T2w to the T1w of the same session, with a quality gate."""

    input_spec = _T2InputSpec
    output_spec = _T2OutputSpec

    def _run_registration(self, runtime):
        import nibabel as nib

        from cerebseg.errors import BadDataError
        from cerebseg.utils.images import nib_to_ants
        from cerebseg.utils.registration import rigid_to

        transform, corr = rigid_to(nib_to_ants(nib.load(self.inputs.t1_file)),
                                   nib_to_ants(nib.load(self.inputs.t2_file)),
                                   os.path.join(runtime.cwd, 'T2w_to_T1w_'), self.inputs.seed)
        self._results['qc_file'] = os.path.join(runtime.cwd, 't2_rigid_qc.json')
        with open(self._results['qc_file'], 'w') as fobj:
            json.dump({'T2wToT1wEdgeCorrelation': round(corr, 4)}, fobj, indent=2)
        if corr < self.inputs.min_correlation:
            raise BadDataError(
                f'{self.inputs.source_file} could not be registered to its T1w: after rigid '
                f'registration the edges of the two images correlate {corr:.3f} (minimum '
                f'{self.inputs.min_correlation}). The T2w is from another person or session, '
                'covers another part of the head, or is corrupted. Remove it from the selection '
                '(--bids-filter-file) or run T1w-only with --t1-only.')
        self._results['transform'] = transform
        return runtime


class _GridInputSpec(_ThreadedInputSpec):
    t1_file = File(exists=True, mandatory=True, desc='bias-corrected T1w, native grid')
    t1_to_mni = File(exists=True, mandatory=True, desc='T1w -> MNI affine (ANTs)')
    t2_file = traits.Str('', usedefault=True, desc='bias-corrected T2w (empty: none)')
    t2_to_t1 = traits.Str('', usedefault=True, desc='T2w -> T1w rigid (ANTs)')
    grid = traits.Dict(mandatory=True, desc='working grid (BoxGrid.to_dict())')
    denoise = traits.Bool(True, usedefault=True, desc='non-local means denoising (native)')


class _GridOutputSpec(TraitedSpec):
    t1_box = File(exists=True, desc='normalised T1w on the working grid')
    t2_box = traits.Str(desc='normalised T2w on the working grid (empty: none)')


class ToWorkingGrid(CerebsegInterface):
    """Denoise, resample into the 0.5 mm MNI box, N4 again inside the box, normalise.

    Denoising (ANTs non-local means, native resolution) runs on the part of the native image
    that maps into the box only: 8 times fewer voxels than a whole head, the same result there.

    The box N4 fits its field on 4 mm voxels (shrink factor 8): at 0.5 mm, shrink factor 2
    costs about 150 s per image on 2 cores for the same smooth field.
    """

    input_spec = _GridInputSpec
    output_spec = _GridOutputSpec

    def _run_interface(self, runtime):
        import ants
        import nibabel as nib
        import numpy as np

        from cerebseg.utils.grid import BoxGrid
        from cerebseg.utils.images import ants_to_nib, atomic_save, nib_to_ants
        from cerebseg.utils.preproc import (bias_correct, denoise, foreground_mask,
                                            normalise_intensity)
        from cerebseg.utils.registration import crop_to_box, set_threads

        set_threads(self.inputs.num_threads)
        ref = BoxGrid.from_dict(self.inputs.grid).reference()
        chain = [self.inputs.t1_to_mni]
        jobs = [('t1_box', self.inputs.t1_file, chain)]
        if self.inputs.t2_file:
            jobs.append(('t2_box', self.inputs.t2_file, chain + [self.inputs.t2_to_t1]))
        self._results['t2_box'] = ''
        for key, path, transforms in jobs:
            moving = crop_to_box(nib_to_ants(nib.load(path)), transforms, ref)
            if self.inputs.denoise:
                moving = denoise(moving)
            boxed = ants.apply_transforms(ref, moving, transforms, interpolator='bSpline')
            data = boxed.numpy().clip(min=0)
            fg = foreground_mask(data)
            boxed = bias_correct(boxed.new_image_like(data),
                                 mask=boxed.new_image_like(fg.astype(np.float32)),
                                 shrink_factor=8)
            norm = normalise_intensity(boxed.numpy(), fg)
            out = os.path.join(runtime.cwd, f'{key}.nii.gz')
            atomic_save(ants_to_nib(boxed.new_image_like(norm)), out)
            self._results[key] = out
        return runtime
