"""Brainstem workflow: the atlas label set (or a trained 2D network) on the subject's 1 mm
brainstem box, native labels, volumes (wiring only)."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.interfaces.brainstem import BrainstemAtlas, BrainstemNetwork
from cerebseg.workflows.native import init_native_wf
from cerebseg.workflows.outputs import BRAINSTEM_OUTPUTS, BRAINSTEM_XFM_OUTPUTS, init_ds_wf
from cerebseg.workflows.workdir import BRAINSTEM_ATLAS, BRAINSTEM_WF


def init_brainstem_wf(*, brainstem: dict, output_dir: str, dseg_meta: dict,
                      template_icv_ml: float, omp_nthreads: int, seed: int,
                      device: str = 'cpu', use_gpu: bool = False, write_xfm: bool = False,
                      name: str = BRAINSTEM_WF):
    """Segment the brainstem (parts, grey/white matter, nuclei) and write its derivatives.

    Parameters
    ----------
    brainstem : dict
        Absolute paths ``t1w`` (template on the brainstem box), ``dseg`` (label set), ``lut``,
        and ``n_labels`` (:meth:`cerebseg.assets.locate.Assets.brainstem`); ``method``
        ``'atlas'`` (default: the label set registered onto the subject) or ``'network'``
        (the 2D network of the checkpoint ``weights``).

    write_xfm : bool
        Also write the T1w -> MNI affine (``--skip-cerebellum``: the cerebellum's outputs, which
        hold it otherwise, are not written).

    Inputs
    ------
    source_file, t1w
        The raw T1w (names the outputs; defines the native grid).
    bs_t1_box
        The T1w on the brainstem box (``preproc_wf``).
    t1_to_mni, brain_to_mni
        The affines of ``preproc_wf`` (the same as the cerebellum's).
    mni_qc
        JSON of the MNI fit quality (merged into the dseg sidecars with the ICV estimate).

    .. workflow::

        inputnode -> atlas (or network) -> native_wf -> ds_wf
    """
    from cerebseg.models.registration import settings_fingerprint

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=['source_file', 't1w', 'bs_t1_box', 't1_to_mni', 'brain_to_mni', 'mni_qc']),
        name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(fields=['dseg_native']), name='outputnode')
    if brainstem.get('method', 'atlas') == 'network':
        atlas = pe.Node(BrainstemNetwork(weights=brainstem['weights'], lut=brainstem['lut'],
                                         device=device, num_threads=omp_nthreads),
                        name='network', n_procs=omp_nthreads, mem_gb=1)
    else:
        atlas = pe.Node(BrainstemAtlas(template_t1=brainstem['t1w'],
                                       atlas_dseg=brainstem['dseg'],
                                       n_labels=brainstem['n_labels'], seed=seed, device=device,
                                       num_threads=omp_nthreads,
                                       settings=settings_fingerprint()),
                        name=BRAINSTEM_ATLAS, n_procs=omp_nthreads, mem_gb=1)
    if use_gpu:
        atlas.use_gpu = True
    native_wf = init_native_wf(lut=brainstem['lut'], template_icv_ml=template_icv_ml,
                               omp_nthreads=omp_nthreads, parts=True, structure='brainstem',
                               label_maps=[brainstem['dseg']])
    ds_wf = init_ds_wf(output_dir=output_dir, dseg_meta=dseg_meta, with_t2w=False,
                       outputs=BRAINSTEM_OUTPUTS + (BRAINSTEM_XFM_OUTPUTS if write_xfm else ()))
    if write_xfm:
        wf.connect(inputnode, 't1_to_mni', ds_wf, 'inputnode.t1_to_mni')
    qc_files = pe.Node(niu.Merge(3), name='qc_files', run_without_submitting=True)
    wf.connect([
        (inputnode, atlas, [('bs_t1_box', 't1_box')]),
        (inputnode, qc_files, [('mni_qc', 'in1')]),
        (native_wf, qc_files, [('outputnode.icv', 'in2'), ('outputnode.fov', 'in3')]),
        (qc_files, ds_wf, [('out', 'inputnode.qc_files')]),
        (inputnode, native_wf, [('t1w', 'inputnode.t1w'), ('t1_to_mni', 'inputnode.t1_to_mni'),
                                ('brain_to_mni', 'inputnode.brain_to_mni')]),
        (atlas, native_wf, [('probseg', 'inputnode.probseg_box')]),
        (inputnode, ds_wf, [('source_file', 'inputnode.source_file')]),
        (atlas, ds_wf, [('dseg', 'inputnode.dseg_box')]),
        (native_wf, ds_wf, [('outputnode.dseg_native', 'inputnode.dseg_native'),
                            ('outputnode.morph', 'inputnode.morph')]),
        (native_wf, outputnode, [('outputnode.dseg_native', 'dseg_native')]),
    ])
    return wf
