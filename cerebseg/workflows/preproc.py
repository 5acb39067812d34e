"""Anatomical preprocessing workflow (wiring only)."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cerebseg.interfaces.preproc import (BoxAffine, CoregisterT2, MNIAffine, ToWorkingGrid,
                                         ValidateAndCorrect)
from cerebseg.utils.registration import MIN_TEMPLATE_CORRELATION
from cerebseg.workflows.workdir import BOX_AFFINE, PREPROC_WF, TO_BS_GRID, TO_GRID

#: below this edge correlation a T2w -> T1w rigid fit is refused (IXI002: 0.74)
MIN_T2_EDGE_CORRELATION = 0.15


def init_preproc_wf(*, templates: dict, grid: dict, use_t2w: bool, omp_nthreads: int,
                    seed: int, region_dseg: list[str], brainstem_grid: dict | None = None,
                    working_box: bool = True, symmetric_affine: bool = True,
                    coarse_affine: bool = False, name: str = PREPROC_WF):
    """Bias correction and denoising (native), MNI affine (whole brain, then refined on
    cerebellum and brainstem), T2w->T1w rigid, working-grid box.

    Parameters
    ----------
    templates : dict
        Paths of the MNI152NLin2009cAsym ``head``, ``brain`` and ``mask`` images.
    grid : dict
        The working grid (``BoxGrid.to_dict()``).
    use_t2w : bool
        Whether a T2w is part of this run.
    region_dseg : list of str
        Library entry label maps (working grid): where the refined affine is fitted.
    brainstem_grid : dict or None
        The 1 mm brainstem box (``BoxGrid.to_dict()``): the T1w is also put on it, by the same
        affine (``bs_t1_box``); None: not needed (``--skip-brainstem``).
    working_box : bool
        False: no 0.5 mm working-grid images (``--skip-cerebellum``; the affine refined on
        cerebellum and brainstem is still fitted).
    symmetric_affine : bool
        Fit the T1w and its world mirror, for the whole-brain affine and for its refinement,
        and average the two (:class:`~cerebseg.interfaces.preproc.MNIAffine`): a mirrored
        input gets exactly the mirrored transform. False: one fit each (``--affine-fit
        single``).
    coarse_affine : bool
        The whole-brain affine from one start on 4 mm copies (``--affine-fit coarse``: for
        tests of how participants are run, not for volumes).

    Inputs
    ------
    t1w, t2w
        Raw input images (``t2w`` unused when ``use_t2w`` is False).

    Outputs
    -------
    t1_to_mni
        ANTs affine T1w -> MNI152NLin2009cAsym, refined on cerebellum and brainstem: the one
        the working grid and the native labels use.
    brain_to_mni
        The whole-brain affine (for the intracranial volume estimate).
    t2_to_t1
        ANTs rigid T2w -> T1w (only with a T2w).
    t1_box, t2_box
        Normalised images on the working grid (``t2_box`` is '' without T2w).
    bs_t1_box
        The normalised T1w on the brainstem box (with ``brainstem_grid`` only).
    t1_corrected
        The bias-corrected T1w on its own grid.
    mni_qc
        JSON file with the fit quality.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=['t1w', 't2w']), name='inputnode')
    outputnode = pe.Node(niu.IdentityInterface(fields=['t1_to_mni', 'brain_to_mni', 't2_to_t1',
                                                       't1_box', 't2_box', 'mni_qc', 't2_qc',
                                                       'bs_t1_box', 't1_corrected']),
                         name='outputnode')
    t1_correct = pe.Node(ValidateAndCorrect(role='T1w', num_threads=omp_nthreads),
                         name='t1_correct', n_procs=omp_nthreads)
    # the registrations run in child processes with one ANTs thread each (reproducible run to
    # run: cerebseg.utils.isolate); the MNI affine and its box refinement fit the T1w and its
    # mirror, two fits at once
    mni_affine = pe.Node(MNIAffine(template_head=templates['head'],
                                   template_brain=templates['brain'],
                                   template_mask=templates['mask'],
                                   min_correlation=MIN_TEMPLATE_CORRELATION,
                                   num_threads=omp_nthreads, seed=seed,
                                   symmetric=symmetric_affine, coarse=coarse_affine),
                         name='mni_affine', n_procs=min(2, omp_nthreads))
    box_affine = pe.Node(BoxAffine(template_head=templates['head'],
                                   template_brain=templates['brain'], entry_dseg=region_dseg,
                                   grid=grid, num_threads=omp_nthreads, seed=seed,
                                   symmetric=symmetric_affine),
                         name=BOX_AFFINE, n_procs=min(2, omp_nthreads))
    to_grid = pe.Node(ToWorkingGrid(grid=grid, num_threads=omp_nthreads, seed=seed),
                      name=TO_GRID, n_procs=omp_nthreads)
    wf.connect([
        (inputnode, t1_correct, [('t1w', 'in_file')]),
        (inputnode, mni_affine, [('t1w', 'source_file')]),
        (t1_correct, mni_affine, [('out_file', 'in_file'),
                                  ('skull_stripped', 'skull_stripped')]),
        (t1_correct, box_affine, [('out_file', 'in_file'),
                                  ('skull_stripped', 'skull_stripped')]),
        (mni_affine, box_affine, [('transform', 'initial')]),
        (box_affine, outputnode, [('transform', 't1_to_mni')]),
        (mni_affine, outputnode, [('transform', 'brain_to_mni'), ('qc_file', 'mni_qc')]),
        (t1_correct, outputnode, [('out_file', 't1_corrected')]),
    ])
    if working_box:
        wf.connect([
            (t1_correct, to_grid, [('out_file', 't1_file')]),
            (box_affine, to_grid, [('transform', 't1_to_mni')]),
            (to_grid, outputnode, [('t1_box', 't1_box'), ('t2_box', 't2_box')]),
        ])
    if brainstem_grid:
        to_bs_grid = pe.Node(ToWorkingGrid(grid=brainstem_grid, num_threads=omp_nthreads,
                                           seed=seed), name=TO_BS_GRID, n_procs=omp_nthreads)
        wf.connect([
            (t1_correct, to_bs_grid, [('out_file', 't1_file')]),
            (box_affine, to_bs_grid, [('transform', 't1_to_mni')]),
            (to_bs_grid, outputnode, [('t1_box', 'bs_t1_box')]),
        ])
    if use_t2w and working_box:
        t2_correct = pe.Node(ValidateAndCorrect(role='T2w', num_threads=omp_nthreads),
                             name='t2_correct', n_procs=omp_nthreads)
        t2_coreg = pe.Node(CoregisterT2(min_correlation=MIN_T2_EDGE_CORRELATION,
                                        num_threads=omp_nthreads, seed=seed),
                           name='t2_coreg', n_procs=1)
        wf.connect([
            (inputnode, t2_correct, [('t2w', 'in_file')]),
            (inputnode, t2_coreg, [('t2w', 'source_file')]),
            (t1_correct, t2_coreg, [('out_file', 't1_file')]),
            (t2_correct, t2_coreg, [('out_file', 't2_file')]),
            (t2_correct, to_grid, [('out_file', 't2_file')]),
            (t2_coreg, to_grid, [('transform', 't2_to_t1')]),
            (t2_coreg, outputnode, [('qc_file', 't2_qc'), ('transform', 't2_to_t1')]),
        ])
    return wf
