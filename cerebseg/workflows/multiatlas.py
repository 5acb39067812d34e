"""Multi-atlas segmentation workflow: register every library entry, fuse, go back to native."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.interfaces.multiatlas import FuseLabels, RegisterEntry
from cerebseg.interfaces.native import LabelVolumes, ProbsToNative
from cerebseg.interfaces.registration import TorchRegisterEntries


def init_multiatlas_wf(*, entries: list[dict], n_labels: int, lut: str, template_icv_ml: float,
                       reg_spacing: float, reg_iterations: list[int], omp_nthreads: int,
                       seed: int, registration: str = 'torch', device: str = 'cpu',
                       use_gpu: bool = False, regnet: str = '', name: str = 'multiatlas_wf'):
    """Register each library entry to the subject, fuse by local weighted voting.

    Parameters
    ----------
    entries : list of dict
        Absolute paths ``t1w``, ``dseg`` and optional ``t2w`` of each library entry.
    registration : {'torch', 'ants'}
        ``torch``: all entries in one batch (diffeomorphic SVF, :mod:`cerebseg.models.registration`)
        on ``device`` (``use_gpu`` when that is a GPU; ``regnet`` a network checkpoint to start
        from, or empty); ``ants``: one ANTs affine + SyN per entry (``reg_spacing``,
        ``reg_iterations``).

    Inputs
    ------
    t1w
        The raw input T1w (defines the native grid).
    t1_box, t2_box, t1_to_mni
        From :func:`~cerebseg.workflows.preproc.init_preproc_wf`.

    Outputs
    -------
    dseg_box, probseg_box
        Fused labels and probabilities on the working grid.
    dseg_native
        Labels on the input T1w's grid.
    morph, icv
        Volume table (TSV) and ICV estimate (JSON).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['t1w', 't1_box', 't2_box', 't1_to_mni']),
                        name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(
        fields=['dseg_box', 'probseg_box', 'dseg_native', 'morph', 'icv']), name='outputnode')
    if registration == 'torch':
        register = pe.Node(
            TorchRegisterEntries(seed=seed, device=device, use_gpu=use_gpu, regnet=regnet,
                                 num_threads=omp_nthreads),
            name='register', n_procs=omp_nthreads, mem_gb=1 + 0.5 * len(entries))
    elif registration == 'ants':
        register = pe.MapNode(
            RegisterEntry(spacing=reg_spacing, iterations=reg_iterations, seed=seed,
                          num_threads=omp_nthreads),
            iterfield=['entry_t1', 'entry_t2', 'entry_dseg'], name='register',
            n_procs=omp_nthreads)
    else:
        raise ValueError(f"registration must be 'torch' or 'ants', not {registration!r}")
    register.inputs.entry_t1 = [e['t1w'] for e in entries]
    register.inputs.entry_t2 = [e.get('t2w', '') for e in entries]
    register.inputs.entry_dseg = [e['dseg'] for e in entries]
    fuse = pe.Node(FuseLabels(n_labels=n_labels, num_threads=omp_nthreads), name='fuse',
                   n_procs=omp_nthreads, mem_gb=4)
    to_native = pe.Node(ProbsToNative(num_threads=omp_nthreads), name='to_native',
                        n_procs=omp_nthreads, mem_gb=2)
    volumes = pe.Node(LabelVolumes(lut=lut, template_icv_ml=template_icv_ml), name='volumes')
    wf.connect([
        (inputnode, register, [('t1_box', 'target_t1')]),
        (inputnode, fuse, [('t1_box', 'target_t1'), ('t2_box', 'target_t2')]),
        (register, fuse, [('warped_t1', 'warped_t1'), ('warped_t2', 'warped_t2'),
                          ('warped_dseg', 'warped_dseg')]),
        (inputnode, to_native, [('t1w', 'reference'), ('t1_to_mni', 't1_to_mni')]),
        (fuse, to_native, [('probseg', 'probseg')]),
        (to_native, volumes, [('out_file', 'dseg')]),
        (inputnode, volumes, [('t1_to_mni', 't1_to_mni')]),
        (fuse, outputnode, [('dseg', 'dseg_box'), ('probseg', 'probseg_box')]),
        (to_native, outputnode, [('out_file', 'dseg_native')]),
        (volumes, outputnode, [('out_file', 'morph'), ('icv_file', 'icv')]),
    ])
    return wf
