"""Multi-atlas interfaces: register a library entry to the subject, fuse the warped labels,
move the lobule borders onto the subject's white-matter branches."""
from __future__ import annotations

import logging
import os

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject,
                                    TraitedSpec, traits)

from cerebseg.interfaces.base import CerebsegInterface

LOGGER = logging.getLogger('cerebseg.interfaces.multiatlas')


class _RegisterInputSpec(BaseInterfaceInputSpec):
    target_t1 = File(exists=True, mandatory=True, desc='subject T1w on the working grid')
    entry_t1 = File(exists=True, mandatory=True, desc='library entry T1w (working grid)')
    entry_t2 = traits.Str('', usedefault=True, desc='library entry T2w (empty: none)')
    entry_dseg = File(exists=True, mandatory=True, desc='library entry labels (working grid)')
    spacing = traits.Float(1.0, usedefault=True, desc='registration resolution (mm)')
    iterations = traits.List(traits.Int, [40, 20, 0], usedefault=True,
                             desc='SyN iterations per level, coarse to fine')
    seed = traits.Int(0, usedefault=True, desc='random seed of the ANTs samplers')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='ITK/ANTs threads')


class _RegisterOutputSpec(TraitedSpec):
    warped_t1 = File(exists=True, desc='entry T1w warped to the subject')
    warped_t2 = traits.Str(desc='entry T2w warped to the subject (empty: none)')
    warped_dseg = File(exists=True, desc='entry labels warped to the subject')


class RegisterEntry(CerebsegInterface):
    """ANTs affine + SyN (:func:`cerebseg.utils.registration.syn_to`): one entry onto the subject.

    The registration runs on ``spacing`` mm copies of both images; the resulting transforms are
    applied to the 0.5 mm entry (labels with ``genericLabel`` interpolation).
    """

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        import ants
        import nibabel as nib
        import numpy as np

        from cerebseg.utils.images import ants_to_nib, atomic_save, nib_to_ants, to_label_image
        from cerebseg.utils.registration import set_threads, syn_to

        set_threads(self.inputs.num_threads)
        target = nib.load(self.inputs.target_t1)
        fixed = nib_to_ants(target)
        moving = nib_to_ants(nib.load(self.inputs.entry_t1))
        transforms = syn_to(fixed, moving, os.path.join(runtime.cwd, 'entry_to_subject_'),
                            self.inputs.seed, iterations=tuple(self.inputs.iterations),
                            spacing=self.inputs.spacing)
        warped = ants.apply_transforms(fixed, moving, transforms, interpolator='linear')
        self._results['warped_t1'] = os.path.join(runtime.cwd, 'warped_T1w.nii.gz')
        atomic_save(ants_to_nib(warped), self._results['warped_t1'])
        self._results['warped_t2'] = ''
        if self.inputs.entry_t2:
            t2 = ants.apply_transforms(fixed, nib_to_ants(nib.load(self.inputs.entry_t2)),
                                       transforms, interpolator='linear')
            self._results['warped_t2'] = os.path.join(runtime.cwd, 'warped_T2w.nii.gz')
            atomic_save(ants_to_nib(t2), self._results['warped_t2'])
        dseg = ants.apply_transforms(fixed, nib_to_ants(nib.load(self.inputs.entry_dseg)),
                                     transforms, interpolator='genericLabel')
        self._results['warped_dseg'] = os.path.join(runtime.cwd, 'warped_dseg.nii.gz')
        atomic_save(to_label_image(np.rint(dseg.numpy()), target.affine),
                    self._results['warped_dseg'])
        return runtime


class _FuseInputSpec(BaseInterfaceInputSpec):
    target_t1 = File(exists=True, mandatory=True, desc='subject T1w on the working grid')
    target_t2 = traits.Str('', usedefault=True, desc='subject T2w on the working grid')
    warped_t1 = InputMultiObject(File(exists=True), mandatory=True, desc='warped entry T1w')
    warped_t2 = InputMultiObject(traits.Str, mandatory=True,
                                 desc="warped entry T2w ('' where an entry has none)")
    warped_dseg = InputMultiObject(File(exists=True), mandatory=True, desc='warped labels')
    n_labels = traits.Int(mandatory=True, desc='number of labels including background')
    radius = traits.Int(2, usedefault=True, desc='patch radius (voxels) of the local similarity')
    search = traits.Int(0, usedefault=True,
                        desc='half-width (voxels) of the cube of shifts where each entry '
                             'searches its best-matching patch (0: local voting)')
    where_defined = traits.Bool(True, usedefault=True,
                                desc='with search: an entry searches only where its own patch '
                                     'lies inside its image (not exactly 0; '
                                     'cerebseg.kernels.wmv.searchable)')
    nonlocal_weight = traits.Range(0.0, 1.0, 1.0, usedefault=True,
                                   desc='with search: the non-local vote\'s share of the '
                                        'probabilities, the local vote\'s the rest (1: '
                                        'non-local only)')
    white_labels = traits.List(traits.Int, value=[], usedefault=True,
                               desc='white-matter label values: when given, each entry\'s '
                                    'T1w levels are matched to the subject\'s first '
                                    '(cerebseg.kernels.wmv.match_levels)')
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc='OpenMP threads')


class _FuseOutputSpec(TraitedSpec):
    dseg = File(exists=True, desc='fused labels on the working grid')
    probseg = File(exists=True, desc='fused label probabilities (4D, uint8 scaled to [0, 1])')


class FuseLabels(CerebsegInterface):
    """Weighted voting, local or non-local (:func:`cerebseg.kernels.wmv.weighted_majority_vote`),
    or both mixed (``nonlocal_weight`` < 1: :func:`cerebseg.kernels.wmv.mix_fusions`), after
    the entries' T1w levels are matched to the subject's (``white_labels``:
    :func:`cerebseg.kernels.wmv.match_levels`).

    Runs the compiled OpenMP kernel when it is built (``num_threads`` threads), else the NumPy
    twin.
    """

    input_spec = _FuseInputSpec
    output_spec = _FuseOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from cerebseg.kernels.wmv import match_levels, mix_fusions, weighted_majority_vote
        from cerebseg.utils.images import atomic_save, to_label_image, to_probseg_image

        ref = nib.load(self.inputs.target_t1)
        use_t2 = bool(self.inputs.target_t2)
        target = [np.asarray(ref.dataobj, np.float32)]
        if use_t2:
            target.append(np.asarray(nib.load(self.inputs.target_t2).dataobj, np.float32))
        n_atlas = len(self.inputs.warped_t1)
        images = np.zeros((n_atlas, len(target)) + ref.shape, np.float32)
        available = np.zeros((n_atlas, len(target)), bool)
        for k, path in enumerate(self.inputs.warped_t1):
            images[k, 0] = np.asarray(nib.load(path).dataobj, np.float32)
            available[k, 0] = True
            if use_t2 and self.inputs.warped_t2[k]:
                images[k, 1] = np.asarray(nib.load(self.inputs.warped_t2[k]).dataobj, np.float32)
                available[k, 1] = True
        labels = np.stack([np.asarray(nib.load(p).dataobj, np.int16)
                           for p in self.inputs.warped_dseg])
        if self.inputs.white_labels:
            for k in range(n_atlas):
                images[k, 0] = match_levels(images[k, 0], labels[k], target[0],
                                            self.inputs.white_labels)
        target = np.stack(target)

        def vote(search):
            return weighted_majority_vote(labels, images, target, self.inputs.n_labels,
                                          available=available, radius=self.inputs.radius,
                                          search=search, where_defined=self.inputs.where_defined,
                                          num_threads=self.inputs.num_threads)

        search, weight = self.inputs.search, self.inputs.nonlocal_weight
        if search and weight < 1.0:
            fusion = mix_fusions(vote(0), vote(search), weight)
        else:
            fusion = vote(search if weight > 0.0 else 0)
        self._results['dseg'] = os.path.join(runtime.cwd, 'fused_dseg.nii.gz')
        atomic_save(to_label_image(fusion.fused, ref.affine), self._results['dseg'])
        # uint8 in 1/255 steps (rounded), labels last: what nibabel writes for the float array
        self._results['probseg'] = os.path.join(runtime.cwd, 'fused_probseg.nii.gz')
        atomic_save(to_probseg_image(fusion.probseg_uint8(), ref.affine),
                    self._results['probseg'])
        return runtime


class _BranchInputSpec(BaseInterfaceInputSpec):
    t1_box = File(exists=True, mandatory=True, desc='bias-corrected T1w on the working grid')
    dseg = File(exists=True, mandatory=True, desc='fused labels on the working grid')
    probseg = File(exists=True, mandatory=True, desc='fused probabilities (same grid)')
    units = traits.List(traits.Int, mandatory=True,
                        desc='unit of each label value (0: background, corpus medullare)')
    sides = traits.List(traits.Int, mandatory=True, desc='side of each label value')
    votes_probseg = traits.Str('', usedefault=True,
                               desc='probabilities of each unit (value u) fused from an '
                                    'independent library (empty: none)')
    votes_weight = traits.Float(0.5, usedefault=True, desc='weight of the unit votes')


class _BranchOutputSpec(TraitedSpec):
    dseg = File(exists=True, desc='labels whose lobule borders follow the branches')
    probseg = File(exists=True, desc='probabilities with the new labels most probable')
    report = File(exists=True, desc='JSON (for the sidecar, key LobuleBorders)')


class BranchBorders(CerebsegInterface):
    """:func:`cerebseg.utils.branches.relabel_by_branches` of fused labels by the subject's
    T1w; the probabilities follow (:func:`~cerebseg.utils.branches.swap_probabilities`)."""

    input_spec = _BranchInputSpec
    output_spec = _BranchOutputSpec

    def _run_interface(self, runtime):
        import json

        import nibabel as nib
        import numpy as np

        from cerebseg.utils.branches import relabel_by_branches, swap_probabilities
        from cerebseg.utils.images import (atomic_save, atomic_write_text, read_probseg,
                                           to_label_image, to_probseg_image)

        seg = nib.load(self.inputs.dseg)
        before = np.asarray(seg.dataobj, np.int16)
        image = np.asarray(nib.load(self.inputs.t1_box).dataobj, np.float32)
        probs = read_probseg(self.inputs.probseg)
        votes = read_probseg(self.inputs.votes_probseg) if self.inputs.votes_probseg else None
        after, info = relabel_by_branches(image, before, probs, self.inputs.units,
                                          self.inputs.sides, zooms=seg.header.get_zooms()[:3],
                                          votes=votes, votes_weight=self.inputs.votes_weight)
        if 'skipped' in info:
            LOGGER.warning('Lobule borders left as fused (%s): %s', info['skipped'],
                           self.inputs.t1_box)
        voxel_ml = float(np.prod(seg.header.get_zooms()[:3])) / 1000.0
        info['changed_ml'] = round(info['changed_voxels'] * voxel_ml, 3)
        probs = swap_probabilities(probs, before, after)
        self._results['dseg'] = os.path.join(runtime.cwd, 'branch_dseg.nii.gz')
        atomic_save(to_label_image(after, seg.affine), self._results['dseg'])
        self._results['probseg'] = os.path.join(runtime.cwd, 'branch_probseg.nii.gz')
        atomic_save(to_probseg_image(np.moveaxis(probs, 0, -1), seg.affine),
                    self._results['probseg'])
        self._results['report'] = os.path.join(runtime.cwd, 'lobule_borders.json')
        atomic_write_text(self._results['report'], json.dumps({'LobuleBorders': info},
                                                              indent=1))
        return runtime
