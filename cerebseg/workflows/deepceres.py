"""DeepCeres workflow: the CNN cascade on the working grid, with the multi-atlas prior."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.interfaces.segmentation import DeepCeresCascade


def init_deepceres_wf(*, weights: dict, lut: str, protocol: str, omp_nthreads: int,
                      device: str = 'cpu', use_gpu: bool = False, name: str = 'deepceres_wf'):
    """Hemisphere network, then the lobule ensemble inside its mask.

    Parameters
    ----------
    weights : dict
        From :func:`cerebseg.models.checkpoint.select_weights`: checkpoint ``files`` and
        ``inputs`` of the ``hemisphere`` and ``lobules`` stages, and the lobule networks'
        ``role`` (``labels`` or ``outline``).

    Inputs
    ------
    t1_box, t2_box
        Working-grid images (``t2_box`` '' without T2w).
    prior
        The multi-atlas probabilities ('' when the networks do not use them).

    Outputs
    -------
    dseg_box, probseg_box, uncertainty, label_uncertainty
        Labels, ensemble probabilities, voxelwise disagreement, per-label uncertainty (TSV).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['t1_box', 't2_box', 'prior']),
                        name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(
        fields=['dseg_box', 'probseg_box', 'uncertainty', 'label_uncertainty']),
        name='outputnode')
    cascade = pe.Node(DeepCeresCascade(
        hemisphere_weights=weights['hemisphere']['files'],
        hemisphere_inputs=weights['hemisphere']['inputs'],
        lobule_weights=weights['lobules']['files'], lobule_inputs=weights['lobules']['inputs'],
        lut=lut, protocol=protocol, role=weights.get('role', 'labels'), device=device,
        use_gpu=use_gpu, num_threads=omp_nthreads),
        name='cascade', n_procs=omp_nthreads, mem_gb=6)
    wf.connect([
        (inputnode, cascade, [('t1_box', 't1_box'), ('t2_box', 't2_box'), ('prior', 'prior')]),
        (cascade, outputnode, [('dseg', 'dseg_box'), ('probseg', 'probseg_box'),
                               ('uncertainty', 'uncertainty'),
                               ('label_uncertainty', 'label_uncertainty')]),
    ])
    return wf
