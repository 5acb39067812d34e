"""Every derivative written by cerebseg is named here (DerivativesDataSink nodes only)."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.interfaces.bids import DerivativesDataSink

SPACE = 'MNI152NLin2009cAsym'

#: (input field, suffix, extension, entities, sidecar: None, 'dseg', 'prior', 'uncertainty' or
#: 'preproc')
OUTPUTS = (
    ('dseg_native', 'dseg', '.nii.gz', {'space': 'T1w', 'seg': 'cerebellum'}, 'dseg'),
    ('dseg_box', 'dseg', '.nii.gz', {'space': SPACE, 'res': '05', 'seg': 'cerebellum'}, 'dseg'),
    ('t1_box', 'T1w', '.nii.gz', {'space': SPACE, 'res': '05', 'desc': 'preproc'}, 'preproc'),
    ('t1_to_mni', 'xfm', '.mat', {'from': 'T1w', 'to': SPACE, 'mode': 'image'}, None),
    ('morph', 'morph', '.tsv', {'seg': 'cerebellum'}, None),
)
#: the brainstem's (``brainstem_wf``): native labels, labels on the 1 mm MNI box, volumes
BRAINSTEM_OUTPUTS = (
    ('dseg_native', 'dseg', '.nii.gz', {'space': 'T1w', 'seg': 'brainstem'}, 'dseg'),
    ('dseg_box', 'dseg', '.nii.gz', {'space': SPACE, 'res': '1', 'seg': 'brainstem'}, 'dseg'),
    ('morph', 'morph', '.tsv', {'seg': 'brainstem'}, None),
)
#: the brainstem's, when the cerebellum (whose outputs hold it) is skipped
BRAINSTEM_XFM_OUTPUTS = (
    ('t1_to_mni', 'xfm', '.mat', {'from': 'T1w', 'to': SPACE, 'mode': 'image'}, None),
)
#: written only when a T2w was used
T2W_OUTPUTS = (
    ('t2_to_t1', 'xfm', '.mat', {'from': 'T2w', 'to': 'T1w', 'mode': 'image'}, None),
)
#: written only when the networks ran: their input prior and their disagreement
CNN_OUTPUTS = (
    ('dseg_prior_box', 'dseg', '.nii.gz',
     {'space': SPACE, 'res': '05', 'seg': 'cerebellum', 'desc': 'prior'}, 'prior'),
    ('uncertainty', 'uncertainty', '.nii.gz',
     {'space': SPACE, 'res': '05', 'seg': 'cerebellum'}, 'uncertainty'),
)
#: the ``Resolution`` sidecar key (required by BIDS where the ``res`` entity is used)
RESOLUTIONS = {
    '05': f'0.5 mm isotropic: cerebseg\'s working box around the cerebellum and brainstem in '
          f'{SPACE}',
    '1': f'1 mm isotropic: cerebseg\'s box around the brainstem in {SPACE}',
}
PREPROC_META = {'Description': 'The T1w as the networks and the atlas fusion see it: N4 bias '
                               'correction and non-local means denoising in native space, the '
                               'affine to the template, N4 in the box, the 2nd/98th foreground '
                               'percentiles scaled to 0/1.'}
#: which keys of the QC files go into the preprocessed T1w's sidecar, under which name
PREPROC_QC_KEYS = {'InputSkullStripped': 'SkullStripped'}
PRIOR_META = {'Description': 'Multi-atlas labels (weighted voting of the registered '
                             'atlas library), the prior given to the networks; the main dseg is '
                             'the networks\' result.'}
UNCERTAINTY_META = {'Description': 'Voxelwise disagreement of the lobule networks: total-'
                                   'variation distance 0.5 * sum_c |p_i(c) - p_j(c)| between '
                                   'their class probabilities, averaged over pairs of networks '
                                   '(0: identical, 1: disjoint). Its mean within each label is '
                                   'the uncertainty column of the morph table.',
                    'Units': 'arbitrary (0-1)'}


def init_ds_wf(*, output_dir: str, dseg_meta: dict, with_t2w: bool, with_cnn: bool = False,
               outputs: tuple | None = None, name: str = 'ds_wf'):
    """Write the participant's derivatives.

    Inputs
    ------
    source_file
        The raw T1w (names the outputs).
    dseg_native, dseg_box, t1_box, t1_to_mni, morph
        Files to store.
    t2_to_t1
        The T2w -> T1w rigid transform (``with_t2w`` only).
    dseg_prior_box, uncertainty
        The multi-atlas prior and the network disagreement map (``with_cnn`` only).
    qc_files
        JSON files merged into the dseg sidecars (fit quality, ICV).

    ``outputs``: another table of outputs (e.g. :data:`BRAINSTEM_OUTPUTS`) instead of the
    cerebellum's (then ``with_t2w`` and ``with_cnn`` add nothing).
    """
    wf = pe.Workflow(name=name)
    if outputs is None:
        outputs = OUTPUTS + (T2W_OUTPUTS if with_t2w else ()) + \
            (CNN_OUTPUTS if with_cnn else ())
    sources = dseg_meta.get('Sources', [])
    metas = {'dseg': dseg_meta, 'prior': dict(dseg_meta, **PRIOR_META),
             'uncertainty': dict(UNCERTAINTY_META, Sources=sources),
             'preproc': dict(PREPROC_META, Sources=sources)}
    fields = ['source_file', 'qc_files'] + [o[0] for o in outputs]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name='inputnode')
    for field, suffix, ext, entities, sidecar in outputs:
        meta = sidecar_meta(metas.get(sidecar, {}), entities, sources) if sidecar else {}
        node = pe.Node(DerivativesDataSink(base_directory=output_dir, suffix=suffix,
                                           extension=ext, entities=entities, meta=meta),
                       name=f'ds_{field}', run_without_submitting=True)
        wf.connect(inputnode, 'source_file', node, 'source_file')
        wf.connect(inputnode, field, node, 'in_file')
        if sidecar == 'dseg':
            wf.connect(inputnode, 'qc_files', node, 'meta_files')
        elif sidecar == 'preproc':
            node.inputs.meta_keys = PREPROC_QC_KEYS
            wf.connect(inputnode, 'qc_files', node, 'meta_files')
    return wf


def template_url() -> str:
    """Where the MNI152NLin2009cAsym template that cerebseg's MNI grids are cut from comes from
    (the ``SpatialReference`` of the MNI-space images)."""
    from cerebseg.assets import package_json

    return next(f['url'] for f in package_json('sources.json')['files']
                if f['path'].startswith('templates/MNI152NLin2009cAsym/'))


def sidecar_meta(meta: dict, entities: dict, sources: list[str]) -> dict:
    """``meta`` plus the keys BIDS requires or recommends for an image with these entities:
    the ``SpatialReference`` of a ``space-T1w`` image (the T1w it is aligned to,
    ``sources[0]``) or of an MNI-space one (the template), and the ``Resolution`` of one with a
    ``res`` entity."""
    meta = dict(meta)
    if entities.get('space') == 'T1w' and sources:
        meta['SpatialReference'] = sources[0]
    elif entities.get('space') == SPACE:
        meta['SpatialReference'] = template_url()
    if entities.get('res'):
        meta['Resolution'] = RESOLUTIONS[entities['res']]
    return meta

#: the report figures (``sub-X/figures/``, read by ``sub-X.html``): input field, suffix,
#: extension, entities
REPORT_OUTPUTS = (
    ('mni_report', 'T1w', '.svg', {'space': SPACE}),
    ('t2w_report', 'T2w', '.svg', {'desc': 'coreg'}),
    ('cerebellum_report', 'dseg', '.svg', {'seg': 'cerebellum'}),
    ('brainstem_report', 'dseg', '.svg', {'seg': 'brainstem'}),
)


def init_ds_reports_wf(*, output_dir: str, fields: list[str], name: str = 'ds_reports_wf'):
    """Write the report figures named in ``fields`` (see :data:`REPORT_OUTPUTS`).

    Inputs
    ------
    source_file
        The raw T1w (names the figures).
    <field>
        The SVG of each of ``fields``.
    """
    unknown = set(fields) - {o[0] for o in REPORT_OUTPUTS}
    if unknown:
        raise ValueError(f'Unknown report figures {sorted(unknown)}')
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['source_file'] + list(fields)),
                        name='inputnode')
    for field, suffix, ext, entities in REPORT_OUTPUTS:
        if field not in fields:
            continue
        node = pe.Node(DerivativesDataSink(base_directory=output_dir, suffix=suffix,
                                           extension=ext, entities=entities,
                                           datatype='figures'),
                       name=f'ds_{field}', run_without_submitting=True)
        wf.connect([(inputnode, node, [('source_file', 'source_file'), (field, 'in_file')])])
    return wf
