"""The figures of the participant report (wiring only; the HTML is assembled after the run)."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.interfaces.reports import LabelMosaicRPT, RegistrationRPT
from cerebseg.workflows.outputs import SPACE, init_ds_reports_wf


def init_reports_wf(*, output_dir: str, templates: dict, luts: dict[str, str], with_t2w: bool,
                    name: str = 'reports_wf'):
    """Registration checks and label mosaics of one T1w run, written to ``sub-X/figures/``.

    Parameters
    ----------
    templates : dict
        Paths of the MNI template ``head`` and ``mask`` (the mask's outline is drawn on the
        template and on the subject).
    luts : dict
        ``{'cerebellum': lut, 'brainstem': lut}``: the structures segmented in this run.
    with_t2w : bool
        Whether a T2w was registered to the T1w (adds its check).

    Inputs
    ------
    source_file, t1w, t2w
        The raw T1w (names the figures, and is the anatomy shown) and T2w.
    t1_to_mni, t2_to_t1
        The fitted transforms (ANTs).
    dseg_cerebellum, dseg_brainstem
        The label maps on the T1w grid.

    .. workflow::

        inputnode -> mni_rpt, t2w_rpt, cerebellum_rpt, brainstem_rpt -> ds_reports_wf
    """
    unknown = set(luts) - {'cerebellum', 'brainstem'}
    if unknown or not luts:
        raise ValueError(f'luts must name cerebellum and/or brainstem, got {sorted(luts)}')
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=[
        'source_file', 't1w', 't2w', 't1_to_mni', 't2_to_t1', 'dseg_cerebellum',
        'dseg_brainstem']), name='inputnode')
    fields = ['mni_report'] + (['t2w_report'] if with_t2w else []) + \
        [f'{seg}_report' for seg in ('cerebellum', 'brainstem') if seg in luts]
    ds_reports_wf = init_ds_reports_wf(output_dir=output_dir, fields=fields)
    mni_rpt = pe.Node(RegistrationRPT(fixed_file=templates['head'],
                                      contour_file=templates['mask'], fixed_name=SPACE,
                                      moving_name='T1w', title='T1w to template (affine)'),
                      name='mni_rpt', mem_gb=1)
    wf.connect([
        (inputnode, ds_reports_wf, [('source_file', 'inputnode.source_file')]),
        (inputnode, mni_rpt, [('t1w', 'moving_file'), ('t1_to_mni', 'transform')]),
        (mni_rpt, ds_reports_wf, [('out_report', 'inputnode.mni_report')]),
    ])
    if with_t2w:
        t2w_rpt = pe.Node(RegistrationRPT(fixed_name='T1w', moving_name='T2w',
                                          title='T2w to T1w (rigid)'), name='t2w_rpt', mem_gb=1)
        wf.connect([
            (inputnode, t2w_rpt, [('t1w', 'fixed_file'), ('t2w', 'moving_file'),
                                  ('t2_to_t1', 'transform')]),
            (t2w_rpt, ds_reports_wf, [('out_report', 'inputnode.t2w_report')]),
        ])
    titles = {'cerebellum': 'Cerebellar lobules and nuclei, T1w grid',
              'brainstem': 'Brainstem parts and nuclei, T1w grid'}
    for seg, lut in luts.items():
        node = pe.Node(LabelMosaicRPT(lut_file=lut, title=titles[seg]), name=f'{seg}_rpt',
                       mem_gb=1)
        wf.connect([
            (inputnode, node, [('t1w', 'anat_file'), (f'dseg_{seg}', 'dseg_file')]),
            (node, ds_reports_wf, [('out_report', f'inputnode.{seg}_report')]),
        ])
    return wf
