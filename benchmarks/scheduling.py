"""Many participants: one ``cerebseg`` command per participant, one after the other (how a
dataset ran before all runs shared one graph), against one command for all of them.

Usage::

    python benchmarks/scheduling.py --bids ../shared/data/bids/ds002748 --assets-dir .assets \
        --out SCHED --participant-label 01 02 03 04 05 06 07 08 \
        --mode sequential -- --mode graph --omp-nthreads 1 --mem-gb 12

Each ``--mode NAME [cerebseg options]`` group (separated by ``--``) is run from fresh work
and output folders: ``sequential`` runs one command per participant, ``graph`` one command
for all. Prints wall time, the peaks of the whole process tree's memory (sampled every 0.5 s
with psutil: summed PSS, what the tree takes from the machine; summed RSS, which counts shared
libraries once per process; the largest single process), exit codes, and the largest
difference of any structure's volume against the first mode.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault('NIPYPE_NO_ET', '1')
CEREBSEG = [sys.executable, '-m', 'cerebseg.bids_app.run']


def _tree_memory(proc) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, largest RSS) of ``proc`` and its descendants, in bytes. RSS
    counts the pages processes share (torch's libraries, in every worker) once per process;
    PSS splits them between the processes, so its sum is what the tree takes from the
    machine."""
    import psutil

    rss = pss = largest = 0
    try:
        parent = psutil.Process(proc.pid)
        for p in [parent, *parent.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            rss += info.rss
            pss += getattr(info, 'pss', info.rss)
            largest = max(largest, info.rss)
    except psutil.Error:
        pass
    return rss, pss, largest


def timed(cmd: list[str], log: Path) -> tuple[float, tuple[int, int, int], int]:
    """(seconds, peaks of (summed RSS, summed PSS, largest RSS) in bytes, exit code) of
    ``cmd``."""
    peak = [0, 0, 0]
    with open(log, 'ab') as fobj:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=fobj, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[:] = [max(a, b) for a, b in zip(peak, _tree_memory(proc))]
                done.wait(0.5)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        code = proc.wait()
        done.set()
        thread.join()
    return time.monotonic() - start, tuple(peak), code


def volumes(out: Path) -> dict[tuple[str, str], float]:
    vols = {}
    for tsv in sorted(out.glob('sub-*/anat/*_morph.tsv')):
        with open(tsv) as fobj:
            for row in csv.DictReader(fobj, delimiter='\t'):
                vols[(tsv.name, row['name'])] = float(row['volume_mm3'])
    return vols


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    groups, current = [], []
    for token in argv:
        if token == '--':
            groups.append(current)
            current = []
        else:
            current.append(token)
    groups.append(current)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--bids', type=Path, required=True)
    parser.add_argument('--assets-dir', type=Path, required=True)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--participant-label', nargs='+', required=True)
    parser.add_argument('--mode', choices=['sequential', 'graph'], required=True)
    opts, extra = parser.parse_known_args(groups[0])
    modes = [(opts.mode, extra)]
    for group in groups[1:]:
        sub = argparse.ArgumentParser()
        sub.add_argument('--mode', choices=['sequential', 'graph'], required=True)
        o, e = sub.parse_known_args(group)
        modes.append((o.mode, e))
    opts.out.mkdir(parents=True, exist_ok=True)
    rows, reference = [], None
    for i, (mode, extra) in enumerate(modes):
        name = f'{i}-{mode}'
        out, work, log = opts.out / f'out-{name}', opts.out / f'work-{name}', opts.out / f'{name}.log'
        base = CEREBSEG + [str(opts.bids), str(out), 'participant', '--assets-dir',
                           str(opts.assets_dir), '-w', str(work), *extra]
        if mode == 'sequential':
            seconds, peak, codes = 0.0, (0, 0, 0), []
            for label in opts.participant_label:
                sec, pk, c = timed(base + ['--participant-label', label], log)
                seconds, peak = seconds + sec, tuple(max(a, b) for a, b in zip(peak, pk))
                codes.append(c)
        else:
            seconds, peak, code = timed(base + ['--participant-label', *opts.participant_label],
                                        log)
            codes = [code]
        vols = volumes(out)
        if reference is None:
            reference, diff = vols, 0.0
        else:
            common = [k for k in reference if k in vols and reference[k] >= 100]
            diff = max((abs(vols[k] - reference[k]) / reference[k] for k in common), default=0)
        gb = [v / 2 ** 30 for v in peak]
        rows.append((name, ' '.join(extra) or '(defaults)', seconds, gb,
                     ','.join(map(str, sorted(set(codes)))), len(vols), diff))
        print(f'{name}: {seconds / 60:.1f} min, peak RSS {gb[0]:.2f} GB, PSS {gb[1]:.2f} GB, '
              f'largest process {gb[2]:.2f} GB', flush=True)
    n = len(opts.participant_label)
    print(f'\n{n} participants of {opts.bids.name}; {os.cpu_count()} CPUs')
    print('| mode | options | wall (min) | per participant (min) | speed-up | peak memory of '
          'the process tree, GB: PSS / RSS / largest process | exit | volumes | largest '
          'volume diff vs first (>=100 mm3) |')
    print('|---|---|---|---|---|---|---|---|---|')
    for name, extra, seconds, gb, codes, nvol, diff in rows:
        print(f'| {name} | {extra} | {seconds / 60:.1f} | {seconds / 60 / n:.2f} | '
              f'{rows[0][2] / seconds:.2f}x | {gb[1]:.2f} / {gb[0]:.2f} / {gb[2]:.2f} | '
              f'{codes} | {nvol} | {100 * diff:.2f} % |')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
