"""Exceptions that map to the exit codes of the command line.

=====  ===========================================================
code   meaning
=====  ===========================================================
2      usage error (bad arguments, paths)
65     bad input data (EX_DATAERR): unreadable image, not a brain, ...
70     crash (EX_SOFTWARE): a bug or an unexpected failure
74     no space left on the device, or disk quota exceeded (EX_IOERR)
126    missing or corrupt assets (atlas library, weights)
127    missing dependency
=====  ===========================================================
"""
from __future__ import annotations

import os


def _mount_hint() -> str:
    if os.environ.get('CEREBSEG_CONTAINER'):
        return (' (inside a container, check that the folder is mounted: '
                '`docker run -v HOST:CONTAINER` or `singularity run -B HOST:CONTAINER`)')
    return ''


class CerebsegError(Exception):
    """Base class; ``exit_code`` is what the command line returns."""

    exit_code = 70


class UsageError(CerebsegError):
    exit_code = 2


class BadDataError(CerebsegError, ValueError):
    """The input data cannot be processed (the message names the file and why)."""

    exit_code = 65


class MissingAssetError(CerebsegError):
    exit_code = 126


class MissingDependencyError(CerebsegError):
    exit_code = 127


EXIT_CODES = {cls.__name__: cls.exit_code
              for cls in (UsageError, BadDataError, MissingAssetError, MissingDependencyError)}


def missing_path_message(path, what: str) -> str:
    return f'{what} not found: {path}{_mount_hint()}'
