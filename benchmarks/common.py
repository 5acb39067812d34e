"""Helpers the end-to-end benchmarks share: running the real command, splitting its options."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def split_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[own args] -- [cerebseg options]`` -> (own args, cerebseg options)."""
    if '--' not in argv:
        return argv, []
    i = argv.index('--')
    return argv[:i], argv[i + 1:]


def run_cerebseg(bids: Path, out: Path, work: Path, assets: Path, extra: list[str],
                 log: Path) -> float:
    """``cerebseg BIDS OUT participant`` as a user runs it (2 processes, 2 threads), output to
    ``log``; raises with the log's path when it fails. Returns the wall time (s)."""
    cmd = [str(Path(sys.executable).with_name('cerebseg')), str(bids), str(out), 'participant',
           '--assets-dir', str(assets), '-w', str(work), '--nprocs', '2', '--omp-nthreads', '2',
           '--skip-bids-validation', *extra]
    tic = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, 'a') as fobj:
        code = subprocess.run(cmd, stdout=fobj, stderr=subprocess.STDOUT,
                              env=dict(os.environ, NIPYPE_NO_ET='1')).returncode
    if code:
        raise RuntimeError(f'{" ".join(cmd)} exited {code}; see {log}')
    return time.perf_counter() - tic


def summarise(per_case: list[tuple[str, str, dict]], keys: list[str]) -> list[tuple]:
    """``[(method, case, scores), ...]`` -> ``[(method, {key: (mean, sd)}, [volume error per
    case]), ...]``, methods in their first order."""
    import numpy as np

    methods = list(dict.fromkeys(m for m, _, _ in per_case))
    rows = []
    for method in methods:
        scores = [s for m, _, s in per_case if m == method]
        rows.append((method, {k: (np.mean([s[k] for s in scores]),
                                  np.std([s[k] for s in scores])) for k in keys},
                     [s['volume_error_pct'] for s in scores]))
    return rows


def print_score_rows(rows: list[tuple], keys: list[str], dice_digits: int = 4) -> None:
    """Markdown table rows of :func:`summarise`: Dice with ``dice_digits`` decimals, the signed
    total volume error and the other figures with 2, then the volume error of each case."""
    for method, m, per in rows:
        cells = [f'{m[k][0]:.{dice_digits}f} ({m[k][1]:.{dice_digits}f})' if 'dice' in k else
                 f'{m[k][0]:+.2f} ({m[k][1]:.2f})' if k == 'volume_error_pct' else
                 f'{m[k][0]:.2f} ({m[k][1]:.2f})' for k in keys]
        print(f'| {method} | ' + ' | '.join(cells) + ' | '
              + ', '.join(f'{v:+.1f}' for v in per) + ' |')


def print_score_table(per_case: list[tuple[str, str, dict]], keys: list[str],
                      columns: list[str], times: dict[str, float], n_cases: int,
                      dice_digits: int = 4) -> None:
    """The markdown table of ``per_case`` (one column per key, named by ``columns``, between
    the method and the volume error of each case), then the wall time of each method per
    case."""
    head = ['method', *columns, 'volume error per case %']
    print('| ' + ' | '.join(head) + ' |')
    print('|---' * len(head) + '|')
    print_score_rows(summarise(per_case, keys), keys, dice_digits)
    print('\nWall time (2 cores): ' + ', '.join(f'{k} {v / n_cases:.0f} s per case'
                                            for k, v in times.items()))


def write_scores_tsv(path: Path, per_case: list[tuple[str, str, dict]], keys: list[str]) -> None:
    """One row per method and case: the scores ``keys`` and ``volume_ml``."""
    cols = keys + ['volume_ml']
    lines = ['method\tcase\t' + '\t'.join(cols)]
    lines += [f'{m}\t{lab}\t' + '\t'.join(f'{s[k]:.6g}' for k in cols) for m, lab, s in per_case]
    Path(path).write_text('\n'.join(lines) + '\n')
