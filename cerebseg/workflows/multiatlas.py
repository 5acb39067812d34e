"""Multi-atlas segmentation workflow: register every library entry to the subject, fuse."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.interfaces.multiatlas import BranchBorders, FuseLabels, RegisterEntry
from cerebseg.interfaces.registration import TorchRegisterEntries
from cerebseg.workflows.workdir import (BRANCH_BORDERS, FUSE, FUSE_VOTES, MULTIATLAS_WF,
                                        REGISTER, REGISTER_VOTES)


def init_multiatlas_wf(*, entries: list[dict], n_labels: int, reg_spacing: float,
                       reg_iterations: list[int], omp_nthreads: int, seed: int,
                       registration: str = 'torch', device: str = 'cpu', use_gpu: bool = False,
                       regnet: str = '', fusion_search: int = 0,
                       fusion_nonlocal_weight: float = 1.0, white_labels: list | None = None,
                       control_mm: float = 4.0, branches: dict | None = None,
                       name: str = MULTIATLAS_WF):
    """Register each library entry to the subject, fuse by local weighted voting (and move
    the lobule borders onto the subject's white-matter branches).

    Parameters
    ----------
    entries : list of dict
        Absolute paths ``t1w``, ``dseg`` and optional ``t2w`` of each library entry.
    registration : {'torch', 'ants', 'both'}
        ``torch``: all entries in one batch (diffeomorphic SVF, :mod:`cerebseg.models.registration`)
        on ``device`` (``use_gpu`` when that is a GPU; ``regnet`` a network checkpoint to start
        from, or empty); ``ants``: one ANTs affine + SyN per entry (``reg_spacing``,
        ``reg_iterations``); ``both``: each entry registered both ways and all ``2K`` warped
        entries fused (the slowest setting, used for silver-standard training labels).
    fusion_search : int
        Each entry votes the label of its best-matching patch within this many voxels
        (:func:`cerebseg.kernels.wmv.weighted_majority_vote`'s ``search``; 0: local voting).
    fusion_nonlocal_weight : float
        With ``fusion_search``: the non-local vote's share of the fused probabilities, the
        local vote's the rest (:func:`cerebseg.kernels.wmv.mix_fusions`; 1: non-local only).
    white_labels : list of int or None
        The protocol's white-matter label values: each entry's T1w levels are matched to the
        subject's before the vote (:func:`cerebseg.kernels.wmv.match_levels`); None: as warped.
    control_mm : float
        Control grid of the torch registration's velocity field (mm).
    branches : dict or None
        ``units`` and ``sides`` of each label value
        (:func:`cerebseg.utils.branches.relabel_by_branches`): the fused lobule borders move
        onto the T1w's white-matter branches; None: the labels as fused. With ``votes``
        (``entries``, ``n_labels``, ``weight``, ``control_mm``), the entries of an independent
        library whose labels are the units are registered (on their own protocol's control
        grid) and fused too, and their unit probabilities weigh in (``votes_weight``).

    Inputs
    ------
    t1_box, t2_box
        From :func:`~cerebseg.workflows.preproc.init_preproc_wf`.

    Outputs
    -------
    dseg_box, probseg_box
        Fused labels and probabilities on the working grid.
    borders
        JSON of the border move (levels, voxels changed); '' without ``branches``.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['t1_box', 't2_box']), name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(fields=['dseg_box', 'probseg_box', 'borders']),
                         name='outputnode')
    if registration not in ('torch', 'ants', 'both'):
        raise ValueError(f"registration must be 'torch', 'ants' or 'both', not {registration!r}")
    settings = dict(registration=registration, reg_spacing=reg_spacing,
                    reg_iterations=reg_iterations, omp_nthreads=omp_nthreads, seed=seed,
                    device=device, use_gpu=use_gpu, regnet=regnet, control_mm=control_mm)
    fuse = pe.Node(FuseLabels(n_labels=n_labels, search=fusion_search,
                              nonlocal_weight=fusion_nonlocal_weight,
                              white_labels=list(white_labels or []),
                              num_threads=omp_nthreads), name=FUSE,
                   n_procs=omp_nthreads, mem_gb=4)
    _register_into(wf, inputnode, fuse, entries, REGISTER, **settings)
    if branches:
        borders = pe.Node(BranchBorders(units=list(branches['units']),
                                        sides=list(branches['sides'])),
                          name=BRANCH_BORDERS, mem_gb=3)
        wf.connect([
            (inputnode, borders, [('t1_box', 't1_box')]),
            (fuse, borders, [('dseg', 'dseg'), ('probseg', 'probseg')]),
            (borders, outputnode, [('dseg', 'dseg_box'), ('probseg', 'probseg_box'),
                                   ('report', 'borders')]),
        ])
        votes = branches.get('votes')
        if votes:
            # an independent library (another protocol's population atlas, its labels mapped
            # onto the units) registered and fused alone: its unit probabilities weigh in
            fuse_votes = pe.Node(FuseLabels(n_labels=votes['n_labels'], search=0,
                                            num_threads=omp_nthreads), name=FUSE_VOTES,
                                 n_procs=omp_nthreads, mem_gb=3)
            _register_into(wf, inputnode, fuse_votes, votes['entries'], REGISTER_VOTES,
                           **{**settings, 'control_mm': votes.get('control_mm', control_mm)})
            borders.inputs.votes_weight = votes['weight']
            wf.connect(fuse_votes, 'probseg', borders, 'votes_probseg')
    else:
        outputnode.inputs.borders = ''
        wf.connect(fuse, 'dseg', outputnode, 'dseg_box')
        wf.connect(fuse, 'probseg', outputnode, 'probseg_box')
    return wf


def _register_into(wf, inputnode, fuse, entries, name, *, registration, reg_spacing,
                   reg_iterations, omp_nthreads, seed, device, use_gpu, regnet, control_mm):
    """Register ``entries`` onto the subject (``registration``: torch batch, ANTs per entry, or
    both) and connect the warped entries to ``fuse``, whose target is the subject."""
    registers = []
    if registration in ('torch', 'both'):
        from cerebseg.models.registration import settings_fingerprint

        registers.append(pe.Node(
            TorchRegisterEntries(seed=seed, device=device, use_gpu=use_gpu, regnet=regnet,
                                 num_threads=omp_nthreads, settings=settings_fingerprint(),
                                 control_mm=control_mm),
            name=name, n_procs=omp_nthreads, mem_gb=1 + 0.5 * len(entries)))
    if registration in ('ants', 'both'):
        registers.append(pe.MapNode(
            RegisterEntry(spacing=reg_spacing, iterations=reg_iterations, seed=seed,
                          num_threads=omp_nthreads),
            iterfield=['entry_t1', 'entry_t2', 'entry_dseg'],
            name=name if registration == 'ants' else f'{name}_ants',
            n_procs=omp_nthreads))
    for register in registers:
        register.inputs.entry_t1 = [e['t1w'] for e in entries]
        register.inputs.entry_t2 = [e.get('t2w', '') for e in entries]
        register.inputs.entry_dseg = [e['dseg'] for e in entries]
        wf.connect(inputnode, 't1_box', register, 'target_t1')
    wf.connect(inputnode, 't1_box', fuse, 'target_t1')
    wf.connect(inputnode, 't2_box', fuse, 'target_t2')
    warped = ('warped_t1', 'warped_t2', 'warped_dseg')
    if len(registers) == 1:
        wf.connect([(registers[0], fuse, [(w, w) for w in warped])])
        return
    for kind in warped:    # both: the 2K warped entries in one list per image kind
        merge = pe.Node(niu.Merge(len(registers), ravel_inputs=True),
                        name=f'merge_{kind}' if name == REGISTER else f'merge_{name}_{kind}',
                        run_without_submitting=True)
        for i, register in enumerate(registers, start=1):
            wf.connect(register, kind, merge, f'in{i}')
        wf.connect(merge, 'out', fuse, kind)
