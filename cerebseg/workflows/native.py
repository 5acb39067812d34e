"""From working-grid probabilities to native-space labels and their volumes."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.interfaces.native import FieldOfView, LabelVolumes, ProbsToNative, TrimOutline


def init_native_wf(*, lut: str, template_icv_ml: float, omp_nthreads: int,
                   parts: bool = False, outline: str = 'fused',
                   structure: str = 'cerebellum', label_maps=(), name: str = 'native_wf'):
    """Resample the label probabilities to the input T1w's grid and measure each label.

    Inputs
    ------
    t1w
        The raw input T1w (defines the native grid).
    t1_corrected
        The bias-corrected T1w on that grid (only with ``outline`` other than ``fused``).
    t1_to_mni
        T1w -> MNI affine (ANTs) of the working grid.
    brain_to_mni
        The whole-brain T1w -> MNI affine (its determinant scales the ICV estimate).
    probseg_box
        Label probabilities on the working grid (4D uint8, labels last).
    label_uncertainty
        Per-label uncertainty TSV to add to the volume table ('' for none).

    ``parts``: the brainstem: the volume table also sums its parts (lookup table column
    ``part``), and the native labels decide the outline first
    (:func:`cerebseg.utils.native.decide_labels`). ``outline``: ``fused`` (as the probabilities
    give it), ``trimmed`` (the outline voxels that the corrected T1w shows to be mostly CSF
    become background, :func:`cerebseg.utils.outline.trim_outline`) or ``tissue`` (trimmed,
    and the voxels just outside that are mostly tissue, facing CSF, where the fusion gives the
    structure some probability, are added: :func:`cerebseg.utils.outline.tissue_outline`).

    Outputs
    -------
    dseg_native, morph, icv
        Labels on the T1w grid, volume table (TSV), intracranial volume estimate (JSON).
    outline
        JSON of the outline's trimming (levels, voxels removed and added); '' with ``outline``
        ``fused``.
    fov
        JSON of how much of each label lies beyond the edge of the input image, as the
        affine places ``label_maps`` (the library entries' labels in MNI space;
        :class:`~cerebseg.interfaces.native.FieldOfView`; ``structure`` names the labels in
        its warning); the volumes of the labels above its limit are written n/a. Without
        ``label_maps`` nothing is checked and ``fov`` is ''.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=['t1w', 't1_corrected', 't1_to_mni', 'brain_to_mni', 'probseg_box',
                'label_uncertainty']),
        name='inputnode')
    inputnode.inputs.label_uncertainty = ''
    outputnode = pe.Node(niu.IdentityInterface(
        fields=['dseg_native', 'morph', 'icv', 'outline', 'fov']), name='outputnode')
    if outline not in ('fused', 'trimmed', 'tissue'):
        raise ValueError(f'outline {outline!r}: use fused, trimmed or tissue')
    to_native = pe.Node(ProbsToNative(num_threads=omp_nthreads, foreground_first=parts,
                                      foreground=outline == 'tissue'),
                        name='to_native', n_procs=omp_nthreads, mem_gb=2)
    volumes = pe.Node(LabelVolumes(lut=lut, template_icv_ml=template_icv_ml, parts=parts),
                      name='volumes')
    wf.connect([
        (inputnode, to_native, [('t1w', 'reference'), ('t1_to_mni', 't1_to_mni'),
                                ('probseg_box', 'probseg')]),
        (inputnode, volumes, [('brain_to_mni', 't1_to_mni'),
                              ('label_uncertainty', 'uncertainty')]),
        (volumes, outputnode, [('out_file', 'morph'), ('icv_file', 'icv')]),
    ])
    if label_maps:
        fov = pe.Node(FieldOfView(lut=lut, structure=structure, label_maps=list(label_maps)),
                      name='fov', mem_gb=1)
        wf.connect([
            (inputnode, fov, [('t1w', 'reference'), ('t1_to_mni', 't1_to_mni')]),
            (fov, volumes, [('report', 'fov')]),
            (fov, outputnode, [('report', 'fov')]),
        ])
    else:
        outputnode.inputs.fov = ''
    final = to_native
    if outline != 'fused':
        final = pe.Node(TrimOutline(), name='trim_outline', mem_gb=1)
        wf.connect([
            (to_native, final, [('out_file', 'dseg')]),
            (inputnode, final, [('t1_corrected', 't1w')]),
            (final, outputnode, [('report', 'outline')]),
        ])
        if outline == 'tissue':
            wf.connect(to_native, 'foreground', final, 'foreground')
    else:
        outputnode.inputs.outline = ''
    wf.connect([
        (final, volumes, [('out_file', 'dseg')]),
        (final, outputnode, [('out_file', 'dseg_native')]),
    ])
    return wf
