"""The work-folder contract: where a participant run leaves the files that other tools read.

``cerebseg`` puts every T1w run of a command in one Nipype graph (:data:`ROOT_WORKFLOW`) under
the work folder; each run's nodes live in ``WORK/cerebseg_wf/cerebseg_sub-X_wf/``
(:func:`run_folder`). The trainers (``cerebseg-train``) and the benchmarks read some node
outputs there, so that nothing is computed twice; the workflow builders name their
sub-workflows and nodes with the constants below, and ``tests/test_cli.py`` checks every path
of :data:`NODE_OUTPUTS` against the work folder of a real run.

Plain strings and :mod:`pathlib` only: importable by the trainers and benchmarks without
building a workflow.
"""
from __future__ import annotations

from pathlib import Path

#: the top-level Nipype workflow that holds every T1w run of a command
ROOT_WORKFLOW = 'cerebseg_wf'

#: sub-workflows of one run (:func:`cerebseg.workflows.base.init_single_subject_wf`)
PREPROC_WF = 'preproc_wf'
MULTIATLAS_WF = 'multiatlas_wf'
BRAINSTEM_WF = 'brainstem_wf'

#: nodes whose outputs are read from outside the graph
TO_GRID = 'to_grid'            # preproc_wf: the T1w (T2w) on the 0.5 mm cerebellar working box
TO_BS_GRID = 'to_bs_grid'      # preproc_wf: the T1w on the 1 mm brainstem box
BOX_AFFINE = 'box_affine'      # preproc_wf: the T1w-to-MNI affine refined on the boxes
REGISTER = 'register'          # multiatlas_wf: the library entries warped onto the subject
FUSE = 'fuse'                  # multiatlas_wf: the fused multi-atlas labels (the prior)
BRANCH_BORDERS = 'branch_borders'  # multiatlas_wf: lobule borders moved onto the branches
REGISTER_VOTES = 'register_votes'  # multiatlas_wf: the lobule-vote entries (another protocol)
FUSE_VOTES = 'fuse_votes'      # multiatlas_wf: their fused unit probabilities
BRAINSTEM_ATLAS = 'atlas'      # brainstem_wf: the brainstem label set registered (atlas method)

#: node outputs, relative to :func:`run_folder` (the file names are the interfaces')
T1_BOX = f'{PREPROC_WF}/{TO_GRID}/t1_box.nii.gz'
BS_T1_BOX = f'{PREPROC_WF}/{TO_BS_GRID}/t1_box.nii.gz'
FUSED_DSEG = f'{MULTIATLAS_WF}/{FUSE}/fused_dseg.nii.gz'
REGISTERED_DSEG_GLOB = f'{MULTIATLAS_WF}/{REGISTER}/entry*_warped_dseg.nii.gz'
BS_DSEG_BOX = f'{BRAINSTEM_WF}/{BRAINSTEM_ATLAS}/brainstem_dseg.nii.gz'
BOX_AFFINE_GLOB = f'{PREPROC_WF}/{BOX_AFFINE}/*.mat'
REGISTER_DIR = f'{MULTIATLAS_WF}/{REGISTER}'

#: every path above, by name (what the contract test checks)
NODE_OUTPUTS = {'T1_BOX': T1_BOX, 'BS_T1_BOX': BS_T1_BOX, 'FUSED_DSEG': FUSED_DSEG,
                'REGISTERED_DSEG_GLOB': REGISTERED_DSEG_GLOB, 'BS_DSEG_BOX': BS_DSEG_BOX,
                'BOX_AFFINE_GLOB': BOX_AFFINE_GLOB}


def ants_warped_dseg(k: int) -> str:
    """With ``--registration ants`` (or ``both``): library entry ``k`` warped onto the subject
    by the ANTs MapNode (relative to :func:`run_folder`)."""
    return f'{REGISTER_DIR}/mapflow/_{REGISTER}{k}/warped_dseg.nii.gz'


def workflow_name(label: str) -> str:
    """Nipype name of the workflow of one T1w run (``label``: its BIDS entities, e.g.
    ``sub-01_ses-1``); ``cerebseg-train`` uses it too, so that the two share nodes."""
    return f'cerebseg_{label.replace("-", "_")}_wf'


def participant_work_dir(work_dir) -> Path:
    """Where the runs' workflows lie: the base folder of a lone run's workflow that puts its
    nodes where the command's top-level workflow puts them."""
    return Path(work_dir) / ROOT_WORKFLOW


def run_folder(work_dir, label: str) -> Path:
    """The folder of one T1w run's nodes in a work folder."""
    return participant_work_dir(work_dir) / workflow_name(label)


def run_folders(work_dir) -> list[Path]:
    """Every run folder of a work folder, sorted by name."""
    return sorted(participant_work_dir(work_dir).glob(workflow_name('sub-*')))
