"""The group report, ``group_report.html``: distributions, asymmetry and outliers as
inline SVG whose points link to the participant reports (no script, nothing fetched).
"""
from __future__ import annotations

import html
import io
import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cerebseg.bids_app.group_data import NA, PALETTE, QC_TABLE, REPORT, SegGroup, fmt, run_ids
from cerebseg.utils.group_stats import (MAD_TO_SD, MIN_OUTLIER_N, MIN_OUTLIER_VOLUME_MM3,
                                        OUTLIER_Z, asymmetry_index, pair_structures)
from cerebseg.utils.images import atomic_write_text

LOGGER = logging.getLogger('cerebseg.group')

OUTLIER_COLOUR = '#d62728'
_POINT = '#cerebseg-pt-'
#: fewer points than this get no box in the plots
MIN_BOX = 5


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif;
       max-width: 1250px; margin: 0 auto; padding: 1em 2em 3em; color: #222; line-height: 1.45; }
h1 { border-bottom: 3px solid #1f77b4; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2.2em; }
nav a { margin-right: 1.2em; }
table { border-collapse: collapse; font-size: .9em; margin: .6em 0 1.2em; }
th, td { border: 1px solid #ddd; padding: .25em .7em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; }
tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.failed { color: #b00020; font-weight: 600; }
.flagged { color: #a65e00; font-weight: 600; }
figure { margin: 1.2em 0 2em; }
figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: .9em; max-width: 62em; }
.note { color: #555; font-size: .9em; }
"""


class _Links:
    """Point links and tooltips: the urls given to matplotlib carry a token that
    :func:`_svg_text` replaces with the link and a ``<title>``."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def urls(self, hrefs: list[str], titles: list[str]) -> list[str]:
        start = len(self.items)
        self.items += list(zip(hrefs, titles))
        return [f'{h}{_POINT}{start + i}' for i, h in enumerate(hrefs)]


def _svg_text(fig, links: _Links, salt: str) -> tuple[str, str]:
    """(inline SVG for the report, standalone SVG file for ``figures/``) of a figure."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({'svg.fonttype': 'none', 'svg.hashsalt': salt}):
        fig.savefig(buf, format='svg', metadata={'Date': None})
    text = buf.getvalue()
    text = text[text.index('<svg'):]

    def linked(prefix: str) -> str:
        def sub(match):
            href, title = links.items[int(match[1])]
            return (f'<a xlink:href="{html.escape(prefix + href)}">'
                    f'<title>{html.escape(title)}</title>')
        return re.sub(r'<a xlink:href="[^"]*' + _POINT + r'(\d+)"[^>]*>', sub, text)

    # matplotlib names every group (figure_1, axes_1, ...): the same ids in each figure of the
    # page; keep only the ids that are referenced (markers, clip paths: salted hashes)
    used = set(re.findall(r'#([\w.:-]+)', text))
    text = re.sub(r' id="([^"]+)"', lambda m: m[0] if m[1] in used else '', text)
    return linked(''), '<?xml version="1.0" encoding="utf-8"?>\n' + linked('../')


def _box(ax, values: np.ndarray, pos: float, width: float, colour: str,
         horizontal: bool = False) -> None:
    """A box plot (quartiles, median, whiskers to the furthest value within 1.5 IQR)."""
    from matplotlib.patches import Rectangle

    v = values[np.isfinite(values)]
    if v.size < MIN_BOX:
        return
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    lo = v[v >= q1 - 1.5 * (q3 - q1)].min()
    hi = v[v <= q3 + 1.5 * (q3 - q1)].max()

    def xy(a, b):
        return (b, a) if horizontal else (a, b)

    w = width / 2
    corner, size = xy(pos - w, q1), xy(width, q3 - q1)
    ax.add_patch(Rectangle(corner, *size, facecolor=colour, alpha=.18, edgecolor=colour,
                           linewidth=.8, zorder=2))
    for a, b in (((pos - w, pos + w), (med, med)), ((pos, pos), (q3, hi)),
                 ((pos, pos), (lo, q1)), ((pos - w / 2, pos + w / 2), (lo, lo)),
                 ((pos - w / 2, pos + w / 2), (hi, hi))):
        ax.plot(*xy(a, b), color=colour, linewidth=1.4 if a[0] != a[1] and b[0] == med else .8,
                zorder=2)


def _levels(grp: SegGroup, levels: dict[str, str]) -> tuple[list[str], list[str]]:
    """The level of each run and the level order (n/a last); one level 'all' without
    --group-by."""
    lev = [levels.get(ids[0], NA) if levels else 'all' for ids in grp.ids]
    order = sorted(set(lev) - {NA}) + ([NA] if NA in lev else [])
    return lev, order


def _short(text: str, size: int) -> str:
    return text if len(text) <= size else text[:size - 1] + '\u2026'


def _legend(fig, order: list[str], group_by: str | None, n_out: int) -> None:
    from matplotlib.lines import Line2D

    if not group_by and not n_out:
        return
    handles = [Line2D([], [], marker='o', linestyle='', color=PALETTE[i % len(PALETTE)],
                      label=_short(f'{group_by} = {lev}', 40) if group_by else 'runs')
               for i, lev in enumerate(order)]
    if n_out:
        handles.append(Line2D([], [], marker='o', linestyle='', markerfacecolor='none',
                              markeredgecolor=OUTLIER_COLOUR, markeredgewidth=1.5,
                              label=f'outlier (|robust z| > {OUTLIER_Z})'))
    wide = max(len(h.get_label()) for h in handles) > 25
    fig.legend(handles=handles, loc='outside upper center',
               ncol=min(len(handles), 3 if wide else 6), frameon=False, fontsize=9)


def _style(ax, axis: str = 'y') -> None:
    from matplotlib.ticker import MaxNLocator

    getattr(ax, f'{axis}axis').set_major_locator(MaxNLocator(nbins=4))
    ax.tick_params(labelsize=7)
    for side in ('top', 'right'):
        ax.spines[side].set_visible(False)


def _volume_figure(grp: SegGroup, lev: list[str], order: list[str], group_by, links: _Links):
    from matplotlib.figure import Figure

    k = len(grp.names)
    ncol = min(6, k)
    nrow = -(-k // ncol)
    fig = Figure(figsize=(2.05 * ncol, 1.8 * nrow + .8), layout='constrained')
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    flags, jitter = grp.flags, np.random.default_rng(0).uniform(-.2, .2, len(grp.labels))
    lev = np.array(lev)
    for j, name in enumerate(grp.names):
        ax, y = axes[j], grp.icv[:, j] * 100
        for li, level in enumerate(order):
            idx = np.flatnonzero((lev == level) & np.isfinite(y))
            colour = PALETTE[li % len(PALETTE)]
            _box(ax, y[idx], li, .62, colour)
            for out in (False, True):  # one marker per scatter: matplotlib reuses its path
                sel = idx[flags[idx, j] == out]
                dots = ax.scatter(li + jitter[sel], y[sel], s=26 if out else 11, color=colour,
                                  edgecolors=OUTLIER_COLOUR if out else 'white',
                                  linewidths=1.5 if out else .4, zorder=3 + out)
                dots.set_urls(links.urls(
                    [f'{grp.ids[i][0]}.html' for i in sel],
                    [f'{grp.labels[i]}: {name} {y[i]:.4g} % ICV ({grp.mm3[i, j]:.0f} mm3), '
                     f'z = {fmt(grp.z[i, j], ".2f")}' for i in sel]))
        ax.set_title(name, fontsize=8 if len(name) < 20 else 6.5)
        ax.set_xlim(-.6, len(order) - .4)
        ax.set_xticks(range(len(order)), [_short(lev, 10) for lev in order] if group_by
                      else [''] * len(order), rotation=90 if len(order) > 3 else 0)
        ax.grid(axis='y', linewidth=.3, alpha=.6)
        _style(ax)
    for ax in axes[k:]:
        ax.remove()
    fig.supylabel('volume (% of the intracranial volume)', fontsize=9)
    _legend(fig, order, group_by, int(flags.sum()))
    return fig


def _asymmetry_figure(grp: SegGroup, pairs, lev: list[str], order: list[str], group_by,
                      links: _Links):
    from matplotlib.figure import Figure

    n_lev = len(order)
    step = .8 / n_lev
    fig = Figure(figsize=(8.5, .3 * len(pairs) * max(1, .7 * n_lev) + 1.6), layout='constrained')
    ax = fig.subplots()
    jitter = np.random.default_rng(1).uniform(-.3, .3, len(grp.labels)) * step
    lev = np.array(lev)
    for p, (base, left, right) in enumerate(pairs):
        ai = asymmetry_index(grp.mm3[:, grp.names.index(left)],
                             grp.mm3[:, grp.names.index(right)])
        for li, level in enumerate(order):
            pos = p + (li - (n_lev - 1) / 2) * step
            idx = np.flatnonzero((lev == level) & np.isfinite(ai))
            colour = PALETTE[li % len(PALETTE)]
            _box(ax, ai[idx], pos, step * .8, colour, horizontal=True)
            dots = ax.scatter(ai[idx], pos + jitter[idx], s=10, color=colour,
                              edgecolors='white', linewidths=.4, zorder=3)
            dots.set_urls(links.urls([f'{grp.ids[i][0]}.html' for i in idx],
                                     [f'{grp.labels[i]}: {base} AI = {ai[i]:+.3f}'
                                      for i in idx]))
    ax.axvline(0, color='#444', linewidth=.8, zorder=1)
    ax.set_yticks(range(len(pairs)), [b for b, _, _ in pairs])
    ax.set_ylim(len(pairs) - .5, -.5)
    ax.set_xlabel('asymmetry index (L - R) / ((L + R) / 2); > 0: left larger', fontsize=9)
    ax.grid(axis='x', linewidth=.3, alpha=.6)
    _style(ax, 'x')
    ax.tick_params(axis='y', labelsize=8)
    _legend(fig, order, group_by, 0)
    return fig


def _table(header: list[str] | None, rows: list[list[str]], num: set[int] = frozenset()) -> str:
    """An HTML table; cells are given as HTML (escape them first)."""
    head = '<tr>' + ''.join(f'<th>{html.escape(h)}</th>' for h in header) + '</tr>' \
        if header else ''
    body = ''.join('<tr>' + ''.join(f'<td class="num">{c}</td>' if i in num else f'<td>{c}</td>'
                                    for i, c in enumerate(r)) + '</tr>\n' for r in rows)
    return f'<table>\n{head}\n{body}</table>\n'


def _link(pid: str, text: str | None = None) -> str:
    return f'<a href="{html.escape(pid)}.html">{html.escape(text or pid)}</a>'


def _versions(output_dir: Path, statuses: dict) -> str:
    try:
        desc = json.loads((output_dir / 'dataset_description.json').read_text())
        gen = [f'{g.get("Name", "?")} {g.get("Version", "")}'.strip()
               for g in desc.get('GeneratedBy', [])]
    except (OSError, ValueError, AttributeError):
        gen = []
    runs = sorted({str(s['version']) for s in statuses.values() if s.get('version')})
    text = ', '.join(gen) or 'unknown (no dataset_description.json)'
    if runs and (len(runs) > 1 or not any(r in text for r in runs)):
        text += f' (participant runs made by {", ".join(runs)})'
    return text


def _seg_section(grp: SegGroup, levels: dict, group_by: str | None,
                 figures: Path | None) -> tuple[str, list[Path]]:
    """The report section of one seg and the figure files written for it."""
    lev, order = _levels(grp, levels)
    parts, files = [f'<h2 id="seg-{grp.seg}">{grp.seg.capitalize()}</h2>'], []
    split = f', split by the participants.tsv column <code>{html.escape(group_by)}</code>' \
        if group_by else ''
    pairs = pair_structures(grp.names)
    box = (f'boxes (from {MIN_BOX} points) give the quartiles and whiskers the furthest '
           'value within 1.5 times the interquartile range')
    plots = [('volumes', (f'Volume of each {grp.seg} structure as a percentage of the '
                          f'intracranial volume, one point per T1w run{split}; {box}. '
                          f'Outliers (|robust z| > {OUTLIER_Z}) are ringed in red. Click a '
                          'point for its participant report; hover for its values.'))]
    if pairs:
        plots.append(('asymmetry', ('Left/right asymmetry index (L - R) / ((L + R) / 2) of '
                                    f'each paired structure{split}; 0: symmetric, +0.1: the '
                                    'left is 10 % larger than the mean of the two sides; '
                                    f'{box}. Click a point for its participant report.')))
    if figures is None:
        parts.append('<p class="note">No figures: matplotlib is not installed.</p>')
    else:
        for kind, caption in plots:
            links = _Links()
            fig = (_volume_figure(grp, lev, order, group_by, links) if kind == 'volumes' else
                   _asymmetry_figure(grp, pairs, lev, order, group_by, links))
            inline, standalone = _svg_text(fig, links, f'cerebseg-{grp.seg}-{kind}')
            path = figures / f'group_seg-{grp.seg}_{kind}.svg'
            files.append(atomic_write_text(path, standalone))
            parts.append(f'<figure>{inline}\n<figcaption>{caption} (<a href="figures/'
                         f'{path.name}">SVG file</a>)</figcaption></figure>')
    rows = []
    for i, j in sorted(zip(*np.nonzero(grp.flags)), key=lambda ij: -abs(grp.z[ij])):
        rows.append([_link(grp.ids[i][0]), *(html.escape(v) for v in grp.ids[i][1:]),
                     html.escape(grp.names[j]), fmt(grp.mm3[i, j], '.1f'),
                     fmt(grp.icv[i, j] * 100, '.4g'), fmt(grp.z[i, j], '+.2f')])
    parts.append(f'<h3>Outliers ({len(rows)})</h3>')
    parts.append(_table(['participant', 'session', 'run', 'structure', 'volume (mm3)',
                         'volume (% ICV)', 'robust z'], rows, {4, 5, 6}) if rows else
                 f'<p>No {grp.seg} volume with |robust z| &gt; {OUTLIER_Z}'
                 + (f' (none is flagged with fewer than {MIN_OUTLIER_N} runs)'
                    if len(grp.labels) < MIN_OUTLIER_N else '') + '.</p>')
    return '\n'.join(parts), files


def write_report(output_dir, groups: list[SegGroup], qc: list[dict], statuses: dict,
                 levels: dict[str, str], group_by: str | None = None) -> list[Path]:
    """``group_report.html`` (self-contained: inline SVG, no script) and its figures in
    ``figures/``; returns the files written, the report last."""
    output_dir = Path(output_dir)
    try:
        import matplotlib  # noqa: F401

        figures = output_dir / 'figures'
    except ImportError:
        LOGGER.warning('matplotlib is not installed: the group report has no figures '
                       '(pip install matplotlib).')
        figures = None
    labels = {lab for g in groups for lab in g.labels} | set(statuses)
    n_failed = sum(r['status'] == 'failed' for r in qc)
    summary = [('Participants', str(len({run_ids(lab)[0] for lab in labels}))),
               ('T1w runs', str(len(labels))),
               ('Runs with volume tables', str(len({lab for g in groups for lab in g.labels}))),
               ('Failed', f'<span class="failed">{n_failed}</span>' if n_failed else '0'),
               ('Flagged', str(len(qc) - n_failed)),
               ('Software', html.escape(_versions(output_dir, statuses))),
               ('Outlier rule', (f'|robust z| &gt; {OUTLIER_Z} of the ICV-normalised volume '
                                 f'(from {MIN_OUTLIER_N} runs on; structures of at least '
                                 f'{MIN_OUTLIER_VOLUME_MM3:g} mm³ median volume)'))]
    if group_by:
        counts = {}
        for lab in labels:
            level = levels.get(run_ids(lab)[0], NA)
            counts[level] = counts.get(level, 0) + 1
        summary.append((f'Runs by {group_by}', ', '.join(
            f'{html.escape(k)}: {v}' for k, v in sorted(counts.items()))))
    sections, files = [], []
    for grp in groups:
        text, new = _seg_section(grp, levels, group_by, figures)
        sections.append(text)
        files += new
    qc_html = _table(['participant', 'session', 'run', 'status', 'reasons'], [
        [_link(r['participant_id']), html.escape(r['session_id']), html.escape(r['run']),
         f'<span class="{r["status"]}">{r["status"]}</span>', html.escape(r['reasons'])]
        for r in qc]) if qc else '<p>No run failed or was flagged.</p>'
    nav = ''.join(f'<a href="#seg-{g.seg}">{g.seg.capitalize()}</a>' for g in groups)
    stamp = datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cerebseg group report</title>
<style>{_CSS}</style>
</head>
<body>
<h1>cerebseg group report</h1>
<nav><a href="#summary">Summary</a><a href="#qc">Failed and flagged runs</a>{nav}\
<a href="#methods">Methods</a></nav>
<h2 id="summary">Summary</h2>
{_table(None, [[f'<b>{html.escape(k)}</b>', v] for k, v in summary])}
<p class="note">Generated {stamp}. Tables: {', '.join(
        f'<a href="group_seg-{g.seg}_morph.tsv">group_seg-{g.seg}_morph.tsv</a>'
        for g in groups)}{', ' if groups else ''}<a href="{QC_TABLE}">{QC_TABLE}</a>.</p>
<h2 id="qc">Failed and flagged runs</h2>
{qc_html}
{''.join(sections)}
<h2 id="methods">Methods</h2>
<p>The robust z-score of a structure is (x - median) / ({MAD_TO_SD} MAD) of its volume divided by
the estimated intracranial volume (ICV), over all runs in the output folder (not per
group); where the MAD is 0 the standard deviation is used instead. A run is flagged when a
structure's |z| exceeds {OUTLIER_Z} (Iglewicz and Hoaglin's modified z-score rule) or when the
participant level raised quality flags; it failed when its exit code was not 0 or it has no
volume table. With fewer than {MIN_OUTLIER_N} runs with a volume no outlier is flagged (the MAD
of so few values is too unstable), and with fewer than about 20 the z-scores mean little. The asymmetry index uses the native volumes
(the ICV cancels out). Review the participant reports of flagged runs before using their
volumes.</p>
</body>
</html>
"""
    files.append(atomic_write_text(output_dir / REPORT, page))
    return files
