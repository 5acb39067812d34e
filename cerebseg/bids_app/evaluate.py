"""``cerebseg-eval``: accuracy of label maps against reference labels, as in DeepCeres' Table 1.

    cerebseg-eval --reference REF_DERIVATIVES --method prior=DIR1 --method cnn=DIR2 \\
        [--space MNI152NLin2009cAsym_res-05] [--participant-label 01 02] --out table.tsv

Label maps are matched by their BIDS entities (sub, ses, acq, rec, run) among the ``*_dseg``
images of the requested ``space`` in each folder. For each method: per-label Dice, whole
cerebellum Dice; printed as mean (sd) over participants with two-sided Wilcoxon signed-rank
p-values (scipy) between methods. Written: the summary TSV (``--out``) and the per-participant
scores next to it (``*_scores.tsv``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cerebseg import __version__
from cerebseg.errors import BadDataError, CerebsegError, UsageError
from cerebseg.interfaces.bids import file_entities, space_matches

LOGGER = logging.getLogger('cerebseg.eval')
KEY_ENTITIES = ('sub', 'ses', 'acq', 'rec', 'run')


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='cerebseg-eval', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=f'cerebseg {__version__}')
    parser.add_argument('--reference', type=Path, required=True,
                        help='derivatives folder with the reference labels')
    parser.add_argument('--method', action='append', required=True, metavar='NAME=DIR',
                        help='a method to score: its name and derivatives folder (repeatable)')
    parser.add_argument('--space', default='MNI152NLin2009cAsym_res-05',
                        help="space entity of the label maps ('T1w', ...; 'none': no space "
                             'entity); default: the working grid cerebseg writes')
    parser.add_argument('--desc', action='append', default=[], metavar='NAME=DESC',
                        help="take method NAME's label maps with this desc entity (e.g. "
                             "prior=prior for cerebseg's desc-prior maps; default: maps "
                             'without desc); NAME may be "reference"')
    parser.add_argument('--participant-label', nargs='+', default=None)
    parser.add_argument('--lut', type=Path, default=None,
                        help='lookup table (default: seg-cerebellum_dseg.tsv of --reference)')
    parser.add_argument('--compare', nargs='+', default=None, metavar='A:B',
                        help='pairs of methods to test (default: the last method against '
                             'each other one)')
    parser.add_argument('--out', type=Path, required=True, help='summary table (TSV) to write')
    parser.add_argument('-v', '--verbose', action='count', default=0)
    return parser


def _key(name: str) -> tuple:
    ents = file_entities(name)
    return tuple((e, ents[e]) for e in KEY_ENTITIES if e in ents)


def label_maps(folder: Path, space: str, participants=None, desc: str | None = None) -> dict:
    """``{entity key: path}`` of the dseg images of one space (and ``desc``, or without
    one) in a derivatives folder."""
    found = {}
    for path in sorted(folder.glob('sub-*/**/*_dseg.nii*')):
        name = path.name
        if (f'_desc-{desc}_' not in name) if desc else ('_desc-' in name):
            continue
        if space == 'none':
            if '_space-' in name:
                continue
        elif not space_matches(name, space):
            continue
        key = _key(name)
        if participants and dict(key).get('sub') not in participants:
            continue
        if key in found:
            raise BadDataError(f'Two label maps for {key} in {folder}: {found[key].name} and '
                               f'{name}; use --space (or --participant-label) to choose.')
        found[key] = path
    return found


def evaluate(opts) -> int:
    import nibabel as nib
    import numpy as np

    from cerebseg.utils.evaluation import dice_per_label, format_table, scores_table, whole_dice
    from cerebseg.utils.labels import read_lut

    methods = {}
    for item in opts.method:
        name, sep, folder = item.partition('=')
        if not sep or not name or not folder:
            raise UsageError(f'--method takes NAME=DIR, got {item!r}')
        if name in methods:
            raise UsageError(f'method name {name!r} given twice')
        methods[name] = Path(folder)
    for what, folder in [('reference', opts.reference)] + list(methods.items()):
        if not folder.is_dir():
            raise UsageError(f'{what} folder not found: {folder}')
    names = list(methods)
    descs = {}
    for item in opts.desc:
        name, sep, desc = item.partition('=')
        if not sep or name not in names + ['reference']:
            raise UsageError(f'--desc takes NAME=DESC with a method name, got {item!r}')
        descs[name] = desc
    compare = [tuple(c.split(':', 1)) for c in opts.compare] if opts.compare else \
        [(names[-1], m) for m in names[:-1]]
    for pair in compare:
        if len(pair) != 2 or not set(pair) <= set(names):
            raise UsageError(f'--compare takes A:B with method names {names}, got {pair}')
    lut_path = opts.lut or opts.reference / 'seg-cerebellum_dseg.tsv'
    if not lut_path.is_file():
        raise UsageError(f'lookup table not found: {lut_path} (give one with --lut)')
    lut = [row for row in read_lut(lut_path) if row[0] != 0]
    values = [v for v, _ in lut]
    refs = label_maps(opts.reference, opts.space, opts.participant_label,
                      descs.get('reference'))
    if not refs:
        raise BadDataError(f'No reference label maps (space {opts.space}) in {opts.reference}')
    found = {m: label_maps(folder, opts.space, opts.participant_label, descs.get(m))
             for m, folder in methods.items()}
    keys = [k for k in refs if all(k in found[m] for m in names)]
    for m in names:
        missing = [k for k in refs if k not in found[m]]
        if missing:
            LOGGER.warning('%s has no label map for %d reference(s), e.g. %s; they are left '
                           'out', m, len(missing), '_'.join('-'.join(e) for e in missing[0]))
    if not keys:
        raise BadDataError('No participant has a label map from every method')
    scores = {m: [] for m in names}
    long_rows = ['participant\tmethod\tindex\tname\tdice']
    for key in keys:
        ref = np.asarray(nib.load(refs[key]).dataobj)
        label = '_'.join('-'.join(e) for e in key)
        for m in names:
            pred = np.asarray(nib.load(found[m][key]).dataobj)
            if pred.shape != ref.shape:
                raise BadDataError(f'{found[m][key]} and {refs[key]} are on different grids '
                                   f'({pred.shape} vs {ref.shape})')
            row = list(dice_per_label(pred, ref, values)) + [whole_dice(pred, ref)]
            scores[m].append(row)
            for (v, n), d in zip(lut + [(-1, 'whole_cerebellum')], row):
                long_rows.append(f'{label}\t{m}\t{v}\t{n}\t{d:.6f}')
    rows = scores_table({m: np.array(s) for m, s in scores.items()}, [n for _, n in lut])
    text, tsv = format_table(rows, names, compare)
    sys.stdout.write(f'Dice against {opts.reference} ({len(keys)} participants, space '
                     f'{opts.space}): mean (sd); p: two-sided Wilcoxon signed-rank\n{text}')
    from cerebseg.utils.images import atomic_write_text

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(opts.out, tsv)
    scores_file = opts.out.with_name(opts.out.name.rsplit('.', 1)[0] + '_scores.tsv')
    atomic_write_text(scores_file, '\n'.join(long_rows) + '\n')
    LOGGER.info('Written: %s and %s', opts.out, scores_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.INFO,
                        format='%(name)s %(levelname)s: %(message)s', stream=sys.stderr)
    try:
        return evaluate(opts)
    except CerebsegError as err:
        LOGGER.error('%s', err)
        return err.exit_code


if __name__ == '__main__':
    raise SystemExit(main())
