"""Top-level workflows of one participant's T1w run (wiring only)."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.workflows.brainstem import init_brainstem_wf
from cerebseg.workflows.deepceres import init_deepceres_wf
from cerebseg.workflows.multiatlas import init_multiatlas_wf
from cerebseg.workflows.native import init_native_wf
from cerebseg.workflows.outputs import init_ds_wf
from cerebseg.workflows.preproc import init_preproc_wf
from cerebseg.workflows.reports import init_reports_wf


def fusion_kwargs(fusion: dict) -> dict:
    """A fusion setting (``search``, ``nonlocal_weight``, ``white_labels``: those of
    :func:`cerebseg.bids_app.metadata.fusion_settings`) as the arguments of
    :func:`init_single_subject_wf` and :func:`init_prior_wf`; one mapping for a run and for the
    training priors."""
    return {'fusion_search': fusion['search'], 'fusion_nonlocal_weight': fusion['nonlocal_weight'],
            'white_labels': fusion['white_labels']}


def init_single_subject_wf(*, t1w: str, t2w: str | None, output_dir: str, templates: dict,
                           grid: dict, library: dict, dseg_meta: dict, omp_nthreads: int,
                           seed: int, reg_spacing: float = 1.0,
                           reg_iterations: tuple[int, ...] = (40, 20, 0),
                           registration: str = 'torch', device: str = 'cpu',
                           use_gpu: bool = False, regnet: str = '', fusion_search: int = 0,
                           fusion_nonlocal_weight: float = 1.0, white_labels: list | None = None,
                           outline: str = 'fused', reg_control_mm: float = 4.0,
                           branches: dict | None = None, cnn: dict | None = None,
                           brainstem: dict | None = None, brainstem_meta: dict | None = None,
                           symmetric_affine: bool = True, coarse_affine: bool = False,
                           cerebellum: bool = True, name: str = 'single_subject_wf'):
    """Segment the cerebellum (and the brainstem) of one T1w (with its T2w when given) and
    write the derivatives.

    Parameters
    ----------
    t1w, t2w : str
        Input images (``t2w`` None for a T1w-only run).
    templates : dict
        Absolute paths of the MNI template ``head``, ``brain``, ``mask``, and ``icv_ml``.
    library : dict
        ``entries`` (absolute paths), ``n_labels``, ``lut`` (absolute path), ``name``.
    dseg_meta : dict
        Static part of the dseg sidecars (sources, method, mode, version).
    registration, device, use_gpu, regnet, fusion_search, fusion_nonlocal_weight, white_labels
        See :func:`~cerebseg.workflows.multiatlas.init_multiatlas_wf`.
    symmetric_affine, coarse_affine : bool
        Fit the T1w and its mirror and average; one coarse fit (see
        :func:`~cerebseg.workflows.preproc.init_preproc_wf`).
    reg_control_mm : float
        Control grid (mm) of the torch registration's velocity field (the protocol's choice).
    outline : str
        ``fused``, ``trimmed`` (the native cerebellum's outline voxels that the bias-corrected
        T1w shows to be mostly CSF become background) or ``tissue`` (trimmed and grown by the
        T1w; see :func:`~cerebseg.workflows.native.init_native_wf`).
    branches : dict or None
        Lobule borders moved onto the T1w's white-matter branches (see
        :func:`~cerebseg.workflows.multiatlas.init_multiatlas_wf`); None: as fused.
    cnn : dict or None
        The DeepCeres weights (:func:`cerebseg.models.checkpoint.select_weights`); None: the
        multi-atlas labels are the result.
    brainstem, brainstem_meta : dict or None
        The brainstem assets (see :func:`~cerebseg.workflows.brainstem.init_brainstem_wf`) and
        the static part of its dseg sidecars; None: no brainstem (``--skip-brainstem``).
    cerebellum : bool
        False: the brainstem only (``--skip-cerebellum``; the cerebellum's affine is still
        fitted: the brainstem box uses it).

    .. workflow::

        inputnode -> preproc_wf -> multiatlas_wf [-> deepceres_wf] -> native_wf -> ds_wf
                               [-> brainstem_wf]
                     native_wf, brainstem_wf -> reports_wf (figures of sub-X.html)
    """
    if not (cerebellum or brainstem):
        raise ValueError('Nothing to segment: neither the cerebellum nor the brainstem.')
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['t1w', 't2w']), name='inputnode')
    inputnode.inputs.t1w = t1w
    if t2w:
        inputnode.inputs.t2w = t2w
    preproc_wf = init_preproc_wf(templates=templates, grid=grid, use_t2w=bool(t2w and cerebellum),
                                 omp_nthreads=omp_nthreads, seed=seed,
                                 region_dseg=[e['dseg'] for e in library['entries']],
                                 brainstem_grid=brainstem['grid'] if brainstem else None,
                                 working_box=cerebellum, symmetric_affine=symmetric_affine,
                                 coarse_affine=coarse_affine)
    wf.connect(inputnode, 't1w', preproc_wf, 'inputnode.t1w')
    luts = {'cerebellum': library['lut']} if cerebellum else {}
    if brainstem:
        luts['brainstem'] = brainstem['lut']
    reports_wf = init_reports_wf(output_dir=output_dir, templates=templates, luts=luts,
                                 with_t2w=bool(t2w and cerebellum))
    wf.connect([
        (inputnode, reports_wf, [('t1w', 'inputnode.source_file'), ('t1w', 'inputnode.t1w')]),
        (preproc_wf, reports_wf, [('outputnode.t1_to_mni', 'inputnode.t1_to_mni')]),
    ])
    if brainstem:
        brainstem_wf = init_brainstem_wf(brainstem=brainstem, output_dir=output_dir,
                                         dseg_meta=brainstem_meta or {},
                                         template_icv_ml=templates['icv_ml'],
                                         omp_nthreads=omp_nthreads, seed=seed, device=device,
                                         use_gpu=use_gpu, write_xfm=not cerebellum)
        wf.connect([
            (inputnode, brainstem_wf, [('t1w', 'inputnode.source_file'),
                                       ('t1w', 'inputnode.t1w')]),
            (preproc_wf, brainstem_wf, [('outputnode.bs_t1_box', 'inputnode.bs_t1_box'),
                                        ('outputnode.t1_to_mni', 'inputnode.t1_to_mni'),
                                        ('outputnode.brain_to_mni', 'inputnode.brain_to_mni'),
                                        ('outputnode.mni_qc', 'inputnode.mni_qc')]),
            (brainstem_wf, reports_wf, [('outputnode.dseg_native', 'inputnode.dseg_brainstem')]),
        ])
    if not cerebellum:
        return wf
    multiatlas_wf = init_multiatlas_wf(
        entries=library['entries'], n_labels=library['n_labels'], reg_spacing=reg_spacing,
        reg_iterations=list(reg_iterations), omp_nthreads=omp_nthreads, seed=seed,
        registration=registration, device=device, use_gpu=use_gpu, regnet=regnet,
        fusion_search=fusion_search, fusion_nonlocal_weight=fusion_nonlocal_weight,
        white_labels=white_labels, control_mm=reg_control_mm, branches=branches)
    native_wf = init_native_wf(lut=library['lut'], template_icv_ml=templates['icv_ml'],
                               omp_nthreads=omp_nthreads, outline=outline,
                               label_maps=[e['dseg'] for e in library['entries']])
    ds_wf = init_ds_wf(output_dir=output_dir, dseg_meta=dseg_meta, with_t2w=bool(t2w),
                       with_cnn=bool(cnn))
    qc_files = pe.Node(niu.Merge(6), name='qc_files', run_without_submitting=True)
    if t2w:
        wf.connect(inputnode, 't2w', preproc_wf, 'inputnode.t2w')
    wf.connect([
        (preproc_wf, multiatlas_wf, [('outputnode.t1_box', 'inputnode.t1_box'),
                                     ('outputnode.t2_box', 'inputnode.t2_box')]),
        (inputnode, native_wf, [('t1w', 'inputnode.t1w')]),
        (preproc_wf, native_wf, [('outputnode.t1_to_mni', 'inputnode.t1_to_mni'),
                                 ('outputnode.brain_to_mni', 'inputnode.brain_to_mni'),
                                 ('outputnode.t1_corrected', 'inputnode.t1_corrected')]),
        (inputnode, ds_wf, [('t1w', 'inputnode.source_file')]),
        (preproc_wf, ds_wf, [('outputnode.t1_box', 'inputnode.t1_box'),
                             ('outputnode.t1_to_mni', 'inputnode.t1_to_mni')]),
        (native_wf, ds_wf, [('outputnode.dseg_native', 'inputnode.dseg_native'),
                            ('outputnode.morph', 'inputnode.morph')]),
        (native_wf, reports_wf, [('outputnode.dseg_native', 'inputnode.dseg_cerebellum')]),
        (preproc_wf, qc_files, [('outputnode.mni_qc', 'in1')]),
        (native_wf, qc_files, [('outputnode.icv', 'in2'), ('outputnode.fov', 'in6')]),
        (qc_files, ds_wf, [('out', 'inputnode.qc_files')]),
    ])
    if outline != 'fused':
        wf.connect(native_wf, 'outputnode.outline', qc_files, 'in4')
    if branches:
        wf.connect(multiatlas_wf, 'outputnode.borders', qc_files, 'in5')
    if cnn:
        deepceres_wf = init_deepceres_wf(weights=cnn, lut=library['lut'],
                                         protocol=library['name'], omp_nthreads=omp_nthreads,
                                         device=device, use_gpu=use_gpu)
        if 'T2w' in cnn['lobules']['inputs'] + cnn['hemisphere']['inputs']:
            wf.connect(preproc_wf, 'outputnode.t2_box', deepceres_wf, 'inputnode.t2_box')
        else:
            deepceres_wf.inputs.inputnode.t2_box = ''
        if 'prior' in cnn['lobules']['inputs'] + cnn['hemisphere']['inputs']:
            wf.connect(multiatlas_wf, 'outputnode.probseg_box', deepceres_wf, 'inputnode.prior')
        else:
            deepceres_wf.inputs.inputnode.prior = ''
        wf.connect([
            (preproc_wf, deepceres_wf, [('outputnode.t1_box', 'inputnode.t1_box')]),
            (deepceres_wf, native_wf, [
                ('outputnode.probseg_box', 'inputnode.probseg_box'),
                ('outputnode.label_uncertainty', 'inputnode.label_uncertainty')]),
            (deepceres_wf, ds_wf, [('outputnode.dseg_box', 'inputnode.dseg_box'),
                                   ('outputnode.uncertainty', 'inputnode.uncertainty')]),
            (multiatlas_wf, ds_wf, [('outputnode.dseg_box', 'inputnode.dseg_prior_box')]),
        ])
    else:
        wf.connect([
            (multiatlas_wf, native_wf, [('outputnode.probseg_box', 'inputnode.probseg_box')]),
            (multiatlas_wf, ds_wf, [('outputnode.dseg_box', 'inputnode.dseg_box')]),
        ])
    if t2w:
        wf.connect([(preproc_wf, qc_files, [('outputnode.t2_qc', 'in3')]),
                    (preproc_wf, ds_wf, [('outputnode.t2_to_t1', 'inputnode.t2_to_t1')]),
                    (inputnode, reports_wf, [('t2w', 'inputnode.t2w')]),
                    (preproc_wf, reports_wf, [('outputnode.t2_to_t1', 'inputnode.t2_to_t1')])])
    return wf


def _gather(t1_box, t2_box, probseg_box, t1_to_mni):
    return t1_box, t2_box, probseg_box, t1_to_mni


def init_prior_wf(*, t1w: str, t2w: str | None, templates: dict, grid: dict, library: dict,
                  omp_nthreads: int, seed: int, registration: str = 'torch', device: str = 'cpu',
                  use_gpu: bool = False, fusion_search: int = 0,
                  fusion_nonlocal_weight: float = 1.0, white_labels: list | None = None,
                  branches: dict | None = None, reg_control_mm: float = 4.0,
                  name: str = 'single_subject_wf'):
    """Working-grid images and multi-atlas prior of one T1w (training data, no derivatives).

    Built from the same sub-workflows, with the same names, as
    :func:`init_single_subject_wf`: given the same name, work folder and settings
    (``reg_control_mm``: the library protocol's; the fusion and the lobule ``branches`` as
    :func:`init_multiatlas_wf` takes them, as the run uses), the nodes a ``cerebseg`` run has
    already computed are reused and the prior is the one the run gives the networks.

    Outputs (``outputnode``, a Function node so that it stays in the executed graph and its
    result can be read): ``t1_box``, ``t2_box``, ``probseg_box``, ``t1_to_mni``.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['t1w', 't2w']), name='inputnode')
    inputnode.inputs.t1w = t1w
    if t2w:
        inputnode.inputs.t2w = t2w
    fields = ['t1_box', 't2_box', 'probseg_box', 't1_to_mni']
    outputnode = pe.Node(niu.Function(input_names=fields, output_names=fields,
                                      function=_gather), name='outputnode',
                         run_without_submitting=True)
    preproc_wf = init_preproc_wf(templates=templates, grid=grid, use_t2w=bool(t2w),
                                 omp_nthreads=omp_nthreads, seed=seed,
                                 region_dseg=[e['dseg'] for e in library['entries']])
    multiatlas_wf = init_multiatlas_wf(
        entries=library['entries'], n_labels=library['n_labels'], reg_spacing=1.0,
        reg_iterations=[40, 20, 0], omp_nthreads=omp_nthreads, seed=seed,
        registration=registration, device=device, use_gpu=use_gpu, fusion_search=fusion_search,
        fusion_nonlocal_weight=fusion_nonlocal_weight, white_labels=white_labels,
        control_mm=reg_control_mm, branches=branches)
    wf.connect(inputnode, 't1w', preproc_wf, 'inputnode.t1w')
    if t2w:
        wf.connect(inputnode, 't2w', preproc_wf, 'inputnode.t2w')
    wf.connect([
        (preproc_wf, multiatlas_wf, [('outputnode.t1_box', 'inputnode.t1_box'),
                                     ('outputnode.t2_box', 'inputnode.t2_box')]),
        (preproc_wf, outputnode, [('outputnode.t1_box', 't1_box'),
                                  ('outputnode.t2_box', 't2_box'),
                                  ('outputnode.t1_to_mni', 't1_to_mni')]),
        (multiatlas_wf, outputnode, [('outputnode.probseg_box', 'probseg_box')]),
    ])
    return wf
