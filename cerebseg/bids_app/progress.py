"""Where a run of many participants stands, from the Nipype scheduler's node events.

:class:`Progress` is given to the plugin as its ``status_callback``: Nipype calls it with each
node and ``'start'``, ``'end'`` or ``'exception'``. It counts nodes per T1w run, says when a
run starts, finishes or fails, shows a one-line progress bar on a terminal (plain log lines
otherwise, at most one a minute between events) and calls ``on_finished(label)`` as soon as
every node of a run has ended, so that its report is written while the others go on. It
keeps the folder of each node that failed: the run's exit code is read from there
(:func:`cerebseg.bids_app.outcome.run_outcome`).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cerebseg.bids_app.logs import IMPORTANT, LOGGER


@dataclass
class RunState:
    label: str
    total: int
    done: int = 0
    busy: float = 0.0   # seconds of its nodes that have ended
    failed: bool = False
    started: float | None = None
    started_at: datetime | None = None   # wall clock, for the status file
    finished: float | None = None
    running: dict = field(default_factory=dict)   # node fullname -> start time
    #: (fullname, folder) of each node reported failed, in order (the folder holds the node's
    #: failure record, see cerebseg.interfaces.base; '' when the node has none)
    failures: list = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.failed:
            return 'failed'
        if self.finished is not None:
            return 'done'
        return 'running' if self.started is not None else 'waiting'


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _detached():
    """What a pickled :class:`Progress` becomes: None (see ``Progress.__reduce__``)."""
    return None


def _node_folder(node) -> str:
    """The working folder of a Nipype node ('' if it has none)."""
    try:
        return str(node.output_dir())
    except Exception:  # noqa: BLE001 - not a node with a folder (a test's stand-in)
        return ''


class Progress:
    """Progress of the T1w runs of one command; ``prefixes`` maps each run's label to the
    Nipype name prefix of its nodes, ``totals`` to its number of nodes; ``failed``: the labels
    of runs that failed before the graph (bad input data), counted as failed."""

    def __init__(self, prefixes: dict[str, str], totals: dict[str, int], on_finished=None,
                 stream=None, interval: float = 60.0, clock=time.monotonic, failed=()):
        self.prefixes = prefixes
        self.runs = {label: RunState(label, totals[label]) for label in prefixes}
        self.runs.update({label: RunState(label, 0, failed=True) for label in failed
                          if label not in prefixes})
        self.on_finished = on_finished
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, 'isatty', lambda: False)())
        self.interval = interval
        self.clock = clock
        self.start = clock()
        self._last_line = self.start
        self._run_seconds: list[float] = []   # node-seconds of each finished run
        self.error: str | None = None   # what the graph raised, if anything (run_workflows)

    # -- the Nipype callback -------------------------------------------------------------
    def __call__(self, node, status: str) -> None:
        try:
            self._event(node, status)
        except Exception:  # noqa: BLE001 - progress must never stop the scheduler
            LOGGER.debug('Progress could not follow %s (%s)', node, status, exc_info=True)

    def __reduce__(self):
        """Nipype keeps the plugin's arguments, this callback among them, on every MapNode,
        and pickles the node into its folder (``_node.pklz``) or a job's script: there, a copy
        would have nothing to follow (and its stream and ``on_finished`` cannot be pickled)."""
        return _detached, ()

    def _event(self, node, status: str) -> None:
        name = node.fullname
        label = self._label(name)
        if label is None and status == 'exception':   # a MapNode's subnode (MultiProc, SLURM)
            label, name = self._folder_label(_node_folder(node))
        if label is None:
            return
        run, now = self.runs[label], self.clock()
        before = run.state
        if run.started is None:   # (MultiProc ends cached nodes without starting them)
            run.started, run.started_at = now, datetime.now(timezone.utc)
            LOGGER.log(IMPORTANT, '%s: started', label)
        if status == 'start':
            run.running[node.fullname] = now
        elif status == 'exception':
            run.running.pop(node.fullname, None)
            run.failures.append((name, _node_folder(node)))
            if not run.failed:
                run.failed = True
                LOGGER.error('%s: failed at %s', label, name.split('.', 2)[-1])
        elif status == 'end':
            if node.fullname not in run.running and run.failed:
                return   # nipype ends a failed node after its exception
            run.busy += now - run.running.pop(node.fullname, now)
            run.done += 1
            if run.done >= run.total and not run.failed and run.finished is None:
                run.finished = now
                self._run_seconds.append(run.busy)
                LOGGER.log(IMPORTANT, '%s: finished in %.1f min', label,
                           (now - run.started) / 60)
                if self.on_finished is not None:
                    self.on_finished(label)
        self._show(now, force=run.state != before)

    def _label(self, fullname: str) -> str | None:
        for label, prefix in self.prefixes.items():
            if fullname.startswith(prefix + '.') or fullname == prefix:
                return label
        return None

    def _folder_label(self, folder: str) -> tuple[str | None, str]:
        """The run of a node known by its folder only, a MapNode's subnode (named
        ``_<name><i>``, without the workflows above it), and a dotted name for it."""
        parts = Path(folder).parts
        for label, prefix in self.prefixes.items():
            want = tuple(prefix.split('.'))
            for i in range(len(parts) - len(want) + 1):
                if parts[i:i + len(want)] == want:
                    return label, '.'.join(p for p in parts[i:] if p != 'mapflow')
        return None, ''

    # -- what is shown -------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {'done': 0, 'running': 0, 'failed': 0, 'waiting': 0}
        for run in self.runs.values():
            out[run.state] += 1
        return out

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left (None before any node has ended). Once a run has finished: the node
        time a run takes (their mean) less what each unfinished run has done, over the node
        time the machine gets through per second so far; before that: the time per node so
        far, times the nodes left."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        live = [r for r in self.runs.values() if not r.failed and r.finished is None]
        if self._run_seconds:
            per_run = sum(self._run_seconds) / len(self._run_seconds)
            busy = sum(r.busy for r in self.runs.values())
            left = sum(max(per_run - r.busy - sum(now - t for t in r.running.values()), 0.0)
                       for r in live)
            return left / (busy / elapsed)
        done = sum(r.done for r in self.runs.values())
        if not done:
            return None
        return elapsed / done * sum(r.total - r.done for r in live)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        c = self.counts()
        stages = sorted({name.split('.')[-1] for r in self.runs.values() for name in r.running})
        eta = self.eta(now)
        return (f'participants: {c["done"]} done, {c["running"]} running, {c["failed"]} failed, '
                f'{c["waiting"]} left | elapsed {_clock(now - self.start)}'
                + (f', about {_clock(eta)} to go' if eta is not None else '')
                + (f' | running: {", ".join(stages)}' if stages else ''))

    def _show(self, now: float, force: bool = False) -> None:
        if self.tty:
            done = sum(r.done for r in self.runs.values())
            total = max(sum(r.total for r in self.runs.values()), 1)
            width = 24
            fill = int(width * done / total)
            text = f'[{"#" * fill}{"." * (width - fill)}] {self.line(now)}'
            self.stream.write('\r' + text[:200].ljust(200))
            self.stream.flush()
        elif force or now - self._last_line >= self.interval:
            LOGGER.log(IMPORTANT, '%s', self.line(now))
            self._last_line = now

    def close(self) -> None:
        if self.tty:
            self.stream.write('\n')
            self.stream.flush()
