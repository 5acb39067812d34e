"""The command line's loggers: ``cerebseg.*`` and Nipype's, one handler on stderr.

``IMPORTANT`` (25) is the level of the milestones shown by default (a run starts, finishes,
the summary); ``-v`` adds INFO, ``-vv`` DEBUG and Nipype's INFO.
"""
from __future__ import annotations

import logging
import sys

#: the logger of the command line (its runs, progress and summary)
LOGGER = logging.getLogger('cerebseg.cli')
IMPORTANT = 25
logging.addLevelName(IMPORTANT, 'IMPORTANT')


def setup_logging(verbose: int) -> None:
    level = {0: IMPORTANT, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(name)s %(levelname)s: %(message)s',
                                           '%y%m%d-%H:%M:%S'))
    root = logging.getLogger('cerebseg')
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ('nipype.workflow', 'nipype.interface', 'nipype.utils'):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO if verbose > 1 else logging.WARNING)
