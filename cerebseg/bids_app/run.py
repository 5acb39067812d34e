"""``cerebseg bids_dir output_dir participant|group``: parse, check, build, run, finalize.

The steps live in their own modules: :mod:`~cerebseg.bids_app.execution` (check, build and run
the workflows), :mod:`~cerebseg.bids_app.metadata` (what a run uses and its sidecar text),
:mod:`~cerebseg.bids_app.outcome` (exit codes, crash files, the summary) and
:mod:`~cerebseg.bids_app.logs`.
"""
from __future__ import annotations

import os
import sys

from cerebseg.bids_app.logs import IMPORTANT, LOGGER, setup_logging


def _set_environment(omp_nthreads: int) -> None:
    """Process-wide settings, made at run time (never at import)."""
    from cerebseg.utils.memory import bound_heap
    from cerebseg.utils.registration import set_itk_environment

    os.environ['NIPYPE_NO_ET'] = '1'
    os.environ['OMP_NUM_THREADS'] = str(omp_nthreads)
    set_itk_environment(omp_nthreads)
    bound_heap()   # (this process and the workers it starts)


def main(argv: list[str] | None = None) -> int:
    from cerebseg.bids_app.parser import parse_args

    opts = parse_args(argv)
    _set_environment(opts.omp_nthreads)
    setup_logging(opts.verbose)

    from cerebseg.bids_app.config import RunConfig
    from cerebseg.bids_app.execution import check_writable, finalize, prepare, run_all
    from cerebseg.bids_app.outcome import command_exit_code, disk_full_message, summary
    from cerebseg.errors import EXIT_DISK_FULL, CerebsegError, disk_full_error

    cfg = RunConfig.from_namespace(opts)
    try:
        check_writable(cfg.output_dir, 'output folder', 'output_dir')
        if cfg.analysis_level == 'participant':
            check_writable(cfg.work_dir, 'work folder', '-w/--work-dir')
        if cfg.analysis_level == 'group':
            from cerebseg.bids_app.group import write_group_outputs

            for path in write_group_outputs(cfg.output_dir, cfg.bids_dir, cfg.group_by or None):
                LOGGER.log(IMPORTANT, 'Group output written: %s', path)
            return 0
        plan = prepare(cfg)
    except CerebsegError as err:
        LOGGER.error('%s', err)
        return err.exit_code
    LOGGER.log(IMPORTANT, 'cerebseg %s: %d T1w run(s) to process; run %s', cfg.version,
               len(plan.runs), cfg.run_uuid)
    if cfg.affine_fit == 'coarse':
        LOGGER.warning('--affine-fit coarse: the affine to MNI152NLin2009cAsym is fitted from '
                       'one start on 4 mm copies (about 1 mm off); for trying out the pipeline, '
                       'not for volumes you report (the sidecars say so).')
    try:
        finalize(cfg, None if cfg.skip_cerebellum else plan.library, plan.brainstem)
    except OSError as err:
        if disk_full_error(err) is None:
            raise
        LOGGER.error('%s', disk_full_message(cfg.output_dir))
        return EXIT_DISK_FULL
    results = run_all(cfg, plan.runs, plan.assets, plan.library, plan.device, plan.brainstem)
    summary(cfg, plan.runs, results, sys.argv[1:] if argv is None else list(argv))
    return command_exit_code(results)


if __name__ == '__main__':
    raise SystemExit(main())
