"""Every derivative written by cerebseg is named here (DerivativesDataSink nodes only)."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.interfaces.bids import DerivativesDataSink

SPACE = 'MNI152NLin2009cAsym'

#: (input field, suffix, extension, entities, gets the dseg sidecar)
OUTPUTS = (
    ('dseg_native', 'dseg', '.nii.gz', {'space': 'T1w', 'seg': 'cerebellum'}, True),
    ('dseg_box', 'dseg', '.nii.gz', {'space': SPACE, 'res': '05', 'seg': 'cerebellum'}, True),
    ('t1_box', 'T1w', '.nii.gz', {'space': SPACE, 'res': '05', 'desc': 'preproc'}, False),
    ('t1_to_mni', 'xfm', '.mat', {'from': 'T1w', 'to': SPACE, 'mode': 'image'}, False),
    ('morph', 'morph', '.tsv', {'seg': 'cerebellum'}, False),
)
#: written only when a T2w was used
T2W_OUTPUTS = (
    ('t2_to_t1', 'xfm', '.mat', {'from': 'T2w', 'to': 'T1w', 'mode': 'image'}, False),
)


def init_ds_wf(*, output_dir: str, dseg_meta: dict, with_t2w: bool, name: str = 'ds_wf'):
    """Write the participant's derivatives.

    Inputs
    ------
    source_file
        The raw T1w (names the outputs).
    dseg_native, dseg_box, t1_box, t1_to_mni, morph
        Files to store.
    t2_to_t1
        The T2w -> T1w rigid transform (``with_t2w`` only).
    qc_files
        JSON files merged into the dseg sidecars (fit quality, ICV).
    """
    wf = pe.Workflow(name=name)
    outputs = OUTPUTS + (T2W_OUTPUTS if with_t2w else ())
    fields = ['source_file', 'qc_files'] + [o[0] for o in outputs]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name='inputnode')
    for field, suffix, ext, entities, sidecar in outputs:
        node = pe.Node(DerivativesDataSink(base_directory=output_dir, suffix=suffix,
                                           extension=ext, entities=entities,
                                           meta=dseg_meta if sidecar else {}),
                       name=f'ds_{field}', run_without_submitting=True)
        wf.connect(inputnode, 'source_file', node, 'source_file')
        wf.connect(inputnode, field, node, 'in_file')
        if sidecar:
            wf.connect(inputnode, 'qc_files', node, 'meta_files')
    return wf
