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

import errno
import os

#: exit code of a crash: a bug or an unexpected failure (EX_SOFTWARE)
EXIT_CRASH = 70
#: exit code when a disk is full or a disk quota is exceeded (EX_IOERR)
EXIT_DISK_FULL = 74
#: the errno values of a full disk: no space left on the device, disk quota exceeded
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _mount_hint() -> str:
    if os.environ.get('CEREBSEG_CONTAINER'):
        return (' (inside a container, check that the folder is mounted: '
                '`docker run -v HOST:CONTAINER` or `singularity run -B HOST:CONTAINER`)')
    return ''


class CerebsegError(Exception):
    """Base class; ``exit_code`` is what the command line returns."""

    exit_code = EXIT_CRASH


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


def _chain(err: BaseException):
    """``err``, then the exceptions it was raised from or while handling, outermost first."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_full_error(err: BaseException) -> OSError | None:
    """The ``OSError`` of a full disk (or exceeded quota) in the chain of ``err``, if any."""
    return next((e for e in _chain(err)
                 if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS), None)


def classify(err: BaseException) -> tuple[int, BaseException]:
    """The exit code of an exception and the exception that decides it, from their types:
    the first :class:`CerebsegError` of its chain (its ``exit_code``: 65 for bad data, ...),
    else an ``OSError`` of a full disk (74), else ``err`` itself (70, a crash)."""
    for cause in _chain(err):
        if isinstance(cause, CerebsegError):
            return cause.exit_code, cause
    full = disk_full_error(err)
    if full is not None:
        return EXIT_DISK_FULL, full
    return EXIT_CRASH, err
