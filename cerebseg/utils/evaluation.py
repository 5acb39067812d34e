"""Segmentation accuracy: per-label Dice, whole-cerebellum Dice, paired Wilcoxon tests, and a
table in the layout of DeepCeres' Table 1 (one row per structure, mean (sd) per method)."""
from __future__ import annotations

import numpy as np

WHOLE = 'Whole cerebellum'
MEAN = 'Mean over labels'


def dice_per_label(pred: np.ndarray, ref: np.ndarray, values) -> np.ndarray:
    """Dice of each label value in ``values`` (NaN where absent from both maps)."""
    if pred.shape != ref.shape:
        raise ValueError(f'label maps differ in shape: {pred.shape} vs {ref.shape}')
    pred = np.asarray(pred, np.int64).ravel()
    ref = np.asarray(ref, np.int64).ravel()
    n = int(max(pred.max(initial=0), ref.max(initial=0), max(values))) + 1
    both = np.bincount(pred[pred == ref], minlength=n)
    sizes = np.bincount(pred, minlength=n) + np.bincount(ref, minlength=n)
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if sizes[v]:
            out[i] = 2.0 * both[v] / sizes[v]
    return out


def whole_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of the union of all non-zero labels."""
    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    denom = p.sum() + r.sum()
    return float(2.0 * (p & r).sum() / denom) if denom else float('nan')


def wilcoxon_p(a, b) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired scores (NaN pairs dropped; 1.0 when
    every difference is zero; NaN with fewer than two pairs)."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if len(a) < 2:
        return float('nan')
    if np.all(a == b):
        return 1.0
    return float(wilcoxon(a, b).pvalue)


def scores_table(scores: dict, names: list[str]) -> dict:
    """Rows of Table 1 from ``scores[method] = (S, L + 1)`` arrays (per-label Dice of ``S``
    subjects, then the whole-cerebellum Dice): ``{row name: {method: values over subjects}}``,
    with the mean over labels of each subject as an extra row."""
    rows = {}
    for i, name in enumerate(names):
        rows[name] = {m: s[:, i] for m, s in scores.items()}
    rows[MEAN] = {m: np.nanmean(s[:, :len(names)], axis=1) for m, s in scores.items()}
    rows[WHOLE] = {m: s[:, len(names)] for m, s in scores.items()}
    return rows


def format_table(rows: dict, methods: list[str], compare: list[tuple[str, str]]) -> tuple:
    """Plain-text table and TSV text: mean (sd) per method and Wilcoxon p per comparison."""
    head = ['structure'] + methods + [f'p {a} vs {b}' for a, b in compare]
    tsv = ['\t'.join(['structure'] + [f'{m}_{k}' for m in methods for k in ('mean', 'sd')]
                     + [f'p_{a}_vs_{b}' for a, b in compare] + ['n'])]
    lines = []
    for name, vals in rows.items():
        cells, tcells = [name], [name]
        for m in methods:
            v = vals[m][~np.isnan(vals[m])]
            mean, sd = (v.mean(), v.std(ddof=1) if len(v) > 1 else 0.0) if len(v) else (np.nan,
                                                                                       np.nan)
            cells.append(f'{mean:.4f} ({sd:.4f})')
            tcells += [f'{mean:.6f}', f'{sd:.6f}']
        for a, b in compare:
            p = wilcoxon_p(vals[a], vals[b])
            cells.append('n/a' if np.isnan(p) else f'{p:.2g}')
            tcells.append('n/a' if np.isnan(p) else f'{p:.6g}')
        tcells.append(str(len(next(iter(vals.values())))))
        lines.append(cells)
        tsv.append('\t'.join(tcells))
    widths = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    fmt = '  '.join(f'{{:{"<" if i == 0 else ">"}{w}}}' for i, w in enumerate(widths))
    text = [fmt.format(*head), fmt.format(*['-' * w for w in widths])]
    text += [fmt.format(*r) for r in lines]
    return '\n'.join(text) + '\n', '\n'.join(tsv) + '\n'
