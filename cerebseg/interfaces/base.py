"""The base of every cerebseg interface: a failure leaves a structured record in its node.

Nipype keeps only the text of a failure (the crash file, the traceback in the result file).
How a run ends (:mod:`cerebseg.bids_app.outcome`: 65 for bad input data, 74 for a full disk,
70 for a crash) is decided from the exception itself: when ``_run_interface`` raises, the
interface writes :data:`FAILURE_RECORD` in its working folder (the node's folder) before the
exception goes on to Nipype::

    {"type": "BadDataError", "exit_code": 65, "errno": null,
     "message": "The T1w ... is not a brain ...", "node": "mni_affine"}

``type``, ``exit_code``, ``errno`` and ``message`` are those of the exception that decides the
exit code (:func:`cerebseg.errors.classify`); ``node`` is the folder's name. A record left by
an earlier command is removed when the interface starts again.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from nipype.interfaces.base import SimpleInterface

from cerebseg.errors import classify

LOGGER = logging.getLogger('nipype.interface')

#: the name of the failure record in a node's folder
FAILURE_RECORD = 'cerebseg_failure.json'


def failure_record(err: BaseException, node: str = '') -> dict:
    """What :data:`FAILURE_RECORD` holds for ``err`` (see the module docstring)."""
    code, cause = classify(err)
    return {'type': type(cause).__name__, 'exit_code': code,
            'errno': getattr(cause, 'errno', None) if isinstance(cause, OSError) else None,
            'message': str(cause), 'node': node}


def write_failure_record(folder, err: BaseException) -> None:
    """Record ``err`` in ``folder``; a record that cannot be written (a full work disk) is
    left out: the run then ends by the checks that need none (see ``outcome``)."""
    from cerebseg.utils.images import atomic_write_text

    folder = Path(folder)
    try:
        atomic_write_text(folder / FAILURE_RECORD,
                          json.dumps(failure_record(err, folder.name), indent=1) + '\n')
    except OSError as exc:
        LOGGER.warning('Could not record the failure of %s in %s: %s', folder.name, folder, exc)


def clear_failure_record(folder) -> None:
    try:
        (Path(folder) / FAILURE_RECORD).unlink(missing_ok=True)
    except OSError:
        LOGGER.debug('Could not remove the failure record in %s', folder, exc_info=True)


def read_failure_records(folder) -> list[dict]:
    """The failure records of a node's folder: its own, and those of its map subnodes
    (``mapflow/_<name><i>/``); unreadable records are skipped."""
    folder = Path(folder)
    records = []
    for path in [folder / FAILURE_RECORD, *sorted(folder.glob(f'mapflow/*/{FAILURE_RECORD}'))]:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get('exit_code'), int):
            records.append(record)
    return records


def _recording_failures(run_interface):
    @functools.wraps(run_interface)
    def wrapper(self, runtime):
        clear_failure_record(runtime.cwd)
        try:
            return run_interface(self, runtime)
        except Exception as err:
            write_failure_record(runtime.cwd, err)
            raise

    wrapper.records_failures = True
    return wrapper


class CerebsegInterface(SimpleInterface):
    """A :class:`~nipype.interfaces.base.SimpleInterface` whose ``_run_interface`` (as each
    subclass defines it) records its failures (see the module docstring)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        run_interface = cls.__dict__.get('_run_interface')
        if run_interface is not None and not getattr(run_interface, 'records_failures', False):
            cls._run_interface = _recording_failures(run_interface)
