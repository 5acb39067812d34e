"""Wall time and peak memory of each stage of one participant, from a fresh work folder.

Usage::

    python benchmarks/participant.py --assets-dir .assets \
        --dataset ../shared/data/bids/multimodal --participant ixi002 \
        --dataset ../shared/data/bids/ds002748 --participant 01 [-- --atlas-library suit]

Options after ``--`` go to every ``cerebseg`` command as they are.

Prints one table per participant (stage, node, seconds, peak memory in GB as sampled by
nipype's resource monitor) and the end-to-end wall time of ``cerebseg ... participant``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('NIPYPE_NO_ET', '1')

from cerebseg.workflows.workdir import ROOT_WORKFLOW  # noqa: E402


def node_table(work: Path) -> list[tuple[str, str, float, float]]:
    from nipype.utils.filemanip import loadpkl

    rows = []
    for res in sorted(work.rglob('result_*.pklz')):
        runtime = loadpkl(res).runtime
        if runtime is None or isinstance(runtime, list):
            continue  # a MapNode's summary: its sub-nodes are listed one by one
        rel = res.parent.relative_to(work)
        if rel.parts[0] == ROOT_WORKFLOW:   # the command's top-level workflow
            rel = rel.relative_to(ROOT_WORKFLOW)
        stage = rel.parts[1] if len(rel.parts) > 2 else '-'
        if stage == 'ds_wf' or res.parent.name == 'qc_files':
            continue
        stage = 'multiatlas_wf' if 'mapflow' in rel.parts else stage
        rows.append((getattr(runtime, 'startTime', ''), stage, res.parent.name,
                     float(getattr(runtime, 'duration', 0.0) or 0.0),
                     float(getattr(runtime, 'mem_peak_gb', 0.0) or 0.0)))
    rows = [r[1:] for r in sorted(rows)]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--assets-dir', required=True)
    parser.add_argument('--dataset', action='append', required=True)
    parser.add_argument('--participant', action='append', required=True)
    parser.add_argument('--nprocs', type=int, default=os.cpu_count())
    parser.add_argument('cerebseg_options', nargs='*',
                        help='after --: options for every cerebseg command')
    opts = parser.parse_args(argv)
    if len(opts.dataset) != len(opts.participant):
        parser.error('give one --participant per --dataset')

    from nipype import config

    from cerebseg.bids_app.run import main as cerebseg

    config.enable_resource_monitor()
    config.set('monitoring', 'sample_frequency', '0.5')
    for dataset, sub in zip(opts.dataset, opts.participant):
        with tempfile.TemporaryDirectory() as tmp:
            work, out = Path(tmp) / 'work', Path(tmp) / 'out'
            cwd = os.getcwd()
            os.chdir(tmp)  # nipype's resource monitor writes .proc-* files into the cwd
            try:
                t0 = time.perf_counter()
                code = cerebseg([str(Path(cwd, dataset)), str(out), 'participant',
                                 '--participant-label', sub,
                                 '--assets-dir', str(Path(cwd, opts.assets_dir)),
                                 '-w', str(work), '--nprocs', str(opts.nprocs),
                                 *opts.cerebseg_options])
                wall = time.perf_counter() - t0
            finally:
                os.chdir(cwd)
            rows = node_table(work)
        print(f'\n## sub-{sub} ({Path(dataset).name}), exit code {code}, '
              f'{opts.nprocs} processes', *opts.cerebseg_options)
        print(f'| {"stage":<14} | {"node":<16} | {"time (s)":>8} | {"peak mem (GB)":>13} |')
        print(f'|{"-" * 16}|{"-" * 18}|{"-" * 10}|{"-" * 15}|')
        for stage, name, secs, mem in rows:
            print(f'| {stage:<14} | {name:<16} | {secs:8.1f} | {mem:13.2f} |')
        print(f'| {"total (wall)":<14} | {"":<16} | {wall:8.1f} | '
              f'{max((r[3] for r in rows), default=0):13.2f} |')
        sys.stdout.flush()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
