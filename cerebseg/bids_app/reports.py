"""The participant report ``sub-X.html``: assembled after the run from the derivatives.

The figures come from the workflow (``sub-X/figures/``, see ``workflows/reports.py``); this
module reads them with the sidecars, the volume tables, the run's status file and its crash
files, computes the QC flags (:mod:`cerebseg.utils.qc`) and writes one HTML page per
participant, every session and run a section of it.
"""
from __future__ import annotations

import csv
import functools
import html
import json
import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path

from cerebseg import __version__
from cerebseg.bids_app.metadata import FUSED_BORDERS_TEXT, FUSED_OUTLINE_TEXT
from cerebseg.utils.images import atomic_write_text

LOGGER = logging.getLogger('cerebseg.reports')

SEGS = ('cerebellum', 'brainstem')

#: figure file name endings (after the run label) -> (section, caption)
FIGURES = (
    ('_space-MNI152NLin2009cAsym_T1w.svg', 'registration',
     'T1w to the MNI152NLin2009cAsym template (affine refined on cerebellum and brainstem). '
     'The T1w and the template alternate; the red line is the template\'s brain outline, '
     'drawn on both. Hover to stop. Cerebellum and brainstem should stay put within the '
     'outline; the cortex may move a little (the fit is weighted to the posterior fossa).'),
    ('_desc-coreg_T2w.svg', 'registration',
     'T2w to T1w (rigid). The two alternate on the T1w grid; edges should not jump.'),
    ('_seg-cerebellum_dseg.svg', 'cerebellum',
     'Cerebellar labels on the T1w, in native space (the volumes are counted on this '
     'grid); the protocol is named in the methods below. Colours: seg-cerebellum_dseg.tsv.'),
    ('_seg-brainstem_dseg.svg', 'brainstem',
     'Brainstem parts (midbrain, pons, medulla; grey and white matter) and nuclei on the '
     'T1w, in native space. Colours: seg-brainstem_dseg.tsv.'),
)

CITATIONS = {
    'cerebellum': 'Morell-Ortega S. et al. (2024). DeepCERES: a deep learning method for '
                  'cerebellar lobule segmentation using ultra-high resolution multimodal MRI.',
    'brainstem': 'Oh et al. (2024). N-DecoNet: brainstem and nuclei segmentation on axial '
                 'slices with a decoder of summed multi-scale features. IEEE ISBI 2024.',
    'ants': 'Avants BB, Epstein CL, Grossman M, Gee JC (2008). Symmetric diffeomorphic image '
            'registration with cross-correlation. Medical Image Analysis 12(1):26-41.',
    'n4': 'Tustison NJ, Avants BB, Cook PA, et al. (2010). N4ITK: improved N3 bias '
          'correction. IEEE Transactions on Medical Imaging 29(6):1310-1320.',
    'mni': 'Fonov V, Evans AC, Botteron K, et al. (2011). Unbiased average age-appropriate '
           'atlases for pediatric studies. NeuroImage 54(1):313-327.',
    'nipype': 'Gorgolewski K, Burns CD, Madison C, et al. (2011). Nipype: a flexible, '
              'lightweight and extensible neuroimaging data processing framework in Python. '
              'Frontiers in Neuroinformatics 5:13.',
    'etiv': 'Buckner RL, Head D, Parker J, et al. (2004). A unified approach for morphometric '
            'and functional data analysis in young, old, and demented adults using automated '
            'atlas-based head size normalization. NeuroImage 23(2):724-738.',
}

_CSS = """
body { font-family: -apple-system, 'Helvetica Neue', Arial, sans-serif; margin: 0;
       color: #222; background: #fafafa; }
nav { position: sticky; top: 0; background: #2c3e50; padding: 0.5em 1em; z-index: 2; }
nav a { color: #ecf0f1; margin-right: 1.2em; text-decoration: none; font-size: 0.95em; }
main { max-width: 1150px; margin: auto; padding: 0 1em 3em 1em; }
h1 { font-size: 1.6em; margin-top: 1em; } h2 { border-bottom: 1px solid #ccc;
     padding-bottom: 0.2em; margin-top: 1.6em; } h3 { margin-top: 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #eef1f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { width: 100%; background: #000; }
figcaption { font-size: 0.88em; color: #555; margin-top: 0.3em; }
.flag { background: #fff4e5; border-left: 4px solid #e67e22; padding: 0.3em 0.7em;
        margin: 0.3em 0; } .ok { background: #eafaf1; border-left: 4px solid #27ae60;
        padding: 0.3em 0.7em; } .error { background: #fdecea; border-left: 4px solid #c0392b;
        padding: 0.3em 0.7em; margin: 0.4em 0; }
pre { background: #f4f4f4; padding: 0.6em; overflow-x: auto; font-size: 0.8em;
      max-height: 24em; }
.cols { display: flex; flex-wrap: wrap; gap: 2em; } .small { font-size: 0.85em; color: #666; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline='', encoding='utf-8') as fobj:
        return list(csv.DictReader(fobj, delimiter='\t'))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_labels(output_dir: Path, subject: str) -> list[str]:
    """Every T1w run label of a participant with results or a status file."""
    sub = output_dir / f'sub-{subject}'
    labels = {p.name.split('_seg-')[0] for p in sub.glob('**/anat/*_seg-*_morph.tsv')}
    labels |= {p.name[:-len('_status.json')] for p in sub.glob('log/*/*_status.json')}
    return sorted(labels)


def latest_status(output_dir: Path, subject: str, label: str) -> tuple[dict, Path | None]:
    """The newest status file of a run (:func:`cerebseg.bids_app.group.read_statuses`) and
    its log folder (where the crash files are)."""
    from cerebseg.bids_app.group import read_statuses

    status = read_statuses(output_dir, subject).get(label, {})
    if not status:
        return {}, None
    return status, Path(output_dir) / f'sub-{subject}' / 'log' / status['run_uuid']


def anat_dir(output_dir: Path, label: str) -> Path:
    """The ``anat`` folder of a run's derivatives (where the sink writes them)."""
    from cerebseg.interfaces.bids import derivative_path

    return derivative_path(output_dir, f'{label}_T1w.nii.gz', 'T1w', '.nii.gz').parent


def run_results(output_dir: Path, label: str) -> dict:
    """Per structure set: the morph rows and the native dseg sidecar of one run."""
    folder = anat_dir(output_dir, label)
    out = {}
    for seg in SEGS:
        morph = folder / f'{label}_seg-{seg}_morph.tsv'
        if morph.is_file():
            out[seg] = {'rows': read_tsv(morph),
                        'meta': _read_json(folder / f'{label}_space-T1w_seg-{seg}_dseg.json')}
    return out


def _volumes(rows: list[dict]) -> dict[str, float]:
    """Measured volumes by name (``n/a``: not measured, left out)."""
    return {r['name']: float(r['volume_mm3']) for r in rows if r['volume_mm3'] != 'n/a'}


def participant_flags(results: dict, reference: dict | None = None,
                      baselines: dict[str, dict[str, float]] | None = None) -> list[dict]:
    """QC flags of one run from its results (:func:`run_results`): template and T2w fit,
    left/right asymmetry (against ``baselines``: seg -> the label set's own asymmetry),
    reference ranges (cerebellum, for the protocol its sidecar names, when the protocol has a
    mapping), network disagreement."""
    from cerebseg.utils import qc

    flags, seen = [], set()
    for seg, res in results.items():
        for flag in qc.fit_flags(res['meta']):
            if flag['kind'] not in seen:   # the same fit is in both sidecars
                seen.add(flag['kind'])
                flags.append(flag)
        flags += qc.field_of_view_flags(res['meta'], seg)
        volumes = _volumes(res['rows'])
        flags += qc.asymmetry_flags(volumes, baseline=(baselines or {}).get(seg))
        if seg == 'cerebellum' and reference:
            protocol = res['meta'].get('AtlasLibrary', {}).get('Name')
            ranges = reference.get('protocols', {}).get(protocol)
            mapping = reference_mapping(protocol)
            if ranges and mapping:
                flags += qc.reference_flags(volumes, ranges, mapping)
        unc = {r['name']: float(r['uncertainty']) for r in res['rows']
               if r.get('uncertainty') not in (None, '', 'n/a')}
        flags += qc.uncertainty_flags(unc)
    return flags


@functools.lru_cache(maxsize=4)
def atlas_asymmetry(dseg_file: str, lut_file: str) -> dict[str, float]:
    """The left/right asymmetry of a label set's own label map (structure -> index); read
    once per process (every run of a participant loop asks for the same one)."""
    import nibabel as nib
    import numpy as np

    from cerebseg.utils.native import read_lut_tsv
    from cerebseg.utils.qc import label_asymmetry

    data = np.asarray(nib.load(dseg_file).dataobj).astype(np.int64).ravel()
    lut = read_lut_tsv(lut_file)
    counts = np.bincount(data, minlength=max(int(r['index']) for r in lut) + 1)
    return label_asymmetry({r['name']: float(counts[int(r['index'])]) for r in lut})


def reference_mapping(protocol: str | None) -> dict | None:
    """The reference structures of a cerebellar label protocol (None: no mapping)."""
    from cerebseg.assets import package_json

    if not protocol:
        return None
    return package_json('reference_map.json')['protocols'].get(protocol)


def _table(header: list[str], rows: list[list], num_cols=()) -> str:
    out = ['<table><tr>' + ''.join(f'<th>{_e(h)}</th>' for h in header) + '</tr>']
    for row in rows:
        cells = [f'<td class="num">{_e(v)}</td>' if i in num_cols else f'<td>{_e(v)}</td>'
                 for i, v in enumerate(row)]
        out.append('<tr>' + ''.join(cells) + '</tr>')
    return '\n'.join(out) + '</table>'


def _volume_table(seg: str, rows: list[dict]) -> str:
    unc = any(r.get('uncertainty') not in (None, '', 'n/a') for r in rows)
    header = ['label', 'structure', 'volume (mm³)', 'fraction of ICV (‰)'] + \
        (['network disagreement'] if unc else [])
    body = []
    total = 0.0
    for r in rows:
        if r['volume_mm3'] == 'n/a':   # the image ends inside it (FieldOfView)
            vol = float('nan')
            line = [r['index'], r['name'], 'not measured', 'n/a']
        else:
            vol = float(r['volume_mm3'])
            line = [r['index'], r['name'], f'{vol:,.0f}',
                    f'{float(r["volume_icv_fraction"]) * 1000:.3f}']
        if r['index'] != 'n/a':   # the brainstem's parts (index n/a) sum labels listed above
            total += vol
        if unc:
            line.append(r.get('uncertainty', 'n/a'))
        body.append(line)
    body.append(['', f'all labels ({seg})',
                 'not measured' if math.isnan(total) else f'{total:,.0f}', '']
                + ([''] if unc else []))
    return _table(header, body, num_cols=(0, 2, 3, 4))


def _summary(label: str, status: dict, results: dict, config: dict) -> str:
    meta = next((r['meta'] for r in results.values() if r['meta']), {})
    cer = results.get('cerebellum', {}).get('meta', {})
    bs = results.get('brainstem', {}).get('meta', {})
    rows = [
        ['Inputs', ', '.join(s.replace('bids:raw:', '') for s in cer.get('Sources', meta.get(
            'Sources', [])))],
        ['Mode', cer.get('Mode', meta.get('Mode', 'n/a'))
         + ('' if not cer else (' (the T2w is used for the cerebellum)'
                                if cer.get('Mode') == 'T1w+T2w' else ''))],
        ['Skull-stripped input', meta.get('InputSkullStripped', 'n/a')],
        ['Cerebellum', cer.get('Description', 'not run')],
        ['Brainstem', bs.get('Description', 'not run')],
        ['Template fit (correlation)', meta.get('TemplateFitCorrelation', 'n/a')],
        ['Template fits of the T1w and of its mirror, apart (mm)',
         meta.get('TemplateFitMirrorDistanceMM', 'n/a')],
        ['Intracranial volume estimate (mm³)', f"{meta['IntracranialVolume_mm3']:,.0f}"
         if 'IntracranialVolume_mm3' in meta else 'n/a'],
        ['Software', meta.get('SoftwareVersion', f'cerebseg {__version__}')],
        ['Models', _models(cer, bs)],
    ]
    if status:
        rows += [['Run', f"{status.get('started', '?')} to {status.get('finished', '?')} "
                         f"({status.get('elapsed_s', 0) / 60:.1f} min)"],
                 ['Device', f"{status.get('device', 'n/a')}, {config.get('nprocs', '?')} "
                            f"processes x {config.get('omp_nthreads', '?')} threads"],
                 ['Exit status', f"{status.get('exit_code')} ({status.get('message', '')})"]]
    for key in ('atlas_library', 'registration', 'models', 'brainstem_method', 'random_seed'):
        if key in config:
            rows.append([f'Option {key}', config[key]])
    return _table(['', label], rows)


def _models(cer: dict, bs: dict) -> str:
    """The networks behind the labels (file names and checksums), or what ran instead."""
    parts = []
    nets = cer.get('Method', {}).get('Networks')
    if nets:
        files = [f"{n['File']} ({n['Architecture']}, sha256 {n['Sha256'][:12]})"
                 for stage in ('Hemisphere', 'Lobules') for n in nets.get(stage, {}).get(
                     'Networks', [])]
        parts.append('cerebellum: ' + ', '.join(files))
    elif cer:
        parts.append('cerebellum: no network (multi-atlas labels)')
    net = bs.get('Method', {}).get('Network')
    if net:
        parts.append(f"brainstem: {net.get('Weights')} ({net.get('Decoder')}, "
                     f"{net.get('Encoder')})")
    elif bs:
        parts.append('brainstem: no network (atlas registration)')
    return '; '.join(parts) or 'n/a'


def _flags_html(flags: list[dict]) -> str:
    if not flags:
        return '<p class="ok">No quality-control flag was raised.</p>'
    return '\n'.join(f'<p class="flag"><b>{_e(f["kind"])}</b>: {_e(f["message"])}</p>'
                     for f in flags)


def _errors_html(folder: Path | None) -> str:
    crashes = sorted(folder.glob('crash-*.txt')) if folder else []
    if not crashes:
        return '<p class="ok">No errors to report.</p>'
    parts = []
    for crash in crashes:
        text = crash.read_text(errors='replace')
        lines = text.strip().splitlines()
        last = next((ln for ln in reversed(lines) if ln.strip()), '')
        node = next((ln.split(':', 1)[1].strip() for ln in lines if ln.startswith('Node:')),
                    crash.name)
        parts.append(f'<div class="error"><b>{_e(node)}</b>: {_e(last)}<details>'
                     f'<summary>{_e(crash.name)}</summary><pre>{_e(text[-6000:])}</pre>'
                     '</details></div>')
    return '\n'.join(parts)


def _methods(results: dict) -> str:
    cer = results.get('cerebellum', {}).get('meta', {})
    bs = results.get('brainstem', {}).get('meta', {})
    text = ['<p>Results included in this report were produced with cerebseg '
            f'{_e(__version__)}, which is based on Nipype [nipype]. The T1w was corrected for '
            'intensity non-uniformity (N4 [n4]) and registered to the ICBM 152 2009c '
            'nonlinear asymmetric template [mni] by an ANTs affine [ants], refined on '
            'the cerebellum and the brainstem'
            + ('; both fits were made for the T1w and for its left-right mirror and averaged, '
               'so that left and right were treated alike.'
               if 'mirror-equivariant' in (cer or bs).get('Method', {}).get('Preprocessing', '')
               else '.')]
    if cer:
        method = cer.get('Method', {})
        lib = cer.get('AtlasLibrary', {})
        protocol = cer.get('LabelProtocol') or f'protocol {lib.get("Name", "?")}'
        text.append(f'The cerebellum was segmented following {_e(protocol)} '
                    f'[{_e(lib.get("Citation", ""))}] '
                    f'by {_e(method.get("Name", "?"))}: {_e(method.get("Registration", ""))} '
                    f'{_e(method.get("Fusion", ""))} Networks, when used, follow DeepCERES '
                    '[cerebellum].')
        borders = method.get('LobuleBorders', '')
        if borders and borders != FUSED_BORDERS_TEXT:
            text.append('The lobule borders were then moved onto the subject\'s white-matter '
                        'branches: ' + _e(borders))
        outline = method.get('Outline', '')
        if outline and outline != FUSED_OUTLINE_TEXT:
            text.append('On the T1w grid, the cerebellum\'s ' + _e(outline))
    if bs:
        method = bs.get('Method', {})
        text.append(f'The brainstem was segmented into its parts and nuclei by '
                    f'{_e(method.get("Name", "?"))} '
                    f'({_e(bs.get("LabelSet", {}).get("Description", ""))}); the network '
                    'option follows N-DecoNet [brainstem].')
    text.append('Label probabilities were brought back to the T1w grid, where the volumes '
                'were counted; the intracranial volume is an eTIV-style estimate from the '
                'affine [etiv].</p>')
    refs = ''.join(f'<li>[{_e(k)}] {_e(v)}</li>' for k, v in CITATIONS.items())
    return ' '.join(text) + f'<h3>References</h3><ul class="small">{refs}</ul>'


def _figures(output_dir: Path, label: str, section: str) -> str:
    sub = label.split('_')[0]
    parts = []
    for ending, where, caption in FIGURES:
        if where != section:
            continue
        path = output_dir / sub / 'figures' / f'{label}{ending}'
        if path.is_file():
            rel = path.relative_to(output_dir).as_posix()
            parts.append(f'<figure><img src="{_e(rel)}" alt="{_e(path.name)}">'
                         f'<figcaption>{_e(caption)} <span class="small">({_e(path.name)})'
                         '</span></figcaption></figure>')
    return '\n'.join(parts) or '<p class="small">No figure for this section.</p>'


def _config(folder: Path | None) -> dict:
    if not folder or not (folder / 'cerebseg.toml').is_file():
        return {}
    import tomllib

    try:
        return tomllib.loads((folder / 'cerebseg.toml').read_text()).get('cerebseg', {})
    except ValueError:
        return {}


def write_participant_report(output_dir, subject: str, reference: dict | None = None
                             ) -> Path:
    """Write ``output_dir/sub-<subject>.html`` (every run of the participant) and return it.

    ``reference``: the assets' reference volume ranges (:meth:`Assets.reference`), None to
    skip that check.
    """
    output_dir = Path(output_dir)
    labels = run_labels(output_dir, subject)
    nav = ['<a href="#summary">Summary</a>', '<a href="#registration">Registration</a>',
           '<a href="#segmentation">Segmentation</a>', '<a href="#volumes">Volumes</a>',
           '<a href="#qc">QC flags</a>', '<a href="#methods">Methods</a>',
           '<a href="#errors">Errors</a>']
    body = [f'<h1>cerebseg report: sub-{_e(subject)}</h1>',
            f'<p class="small">Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by '
            f'cerebseg {_e(__version__)}. {len(labels)} T1w run(s).</p>']
    sections = {k: [] for k in ('summary', 'registration', 'segmentation', 'volumes', 'qc',
                                'errors')}
    methods = ''
    for label in labels:
        status, folder = latest_status(output_dir, subject, label)
        results = run_results(output_dir, label)
        config = _config(folder)
        flags = status.get('qc_flags')
        if flags is None:
            flags = participant_flags(results, reference)
        head = f'<h3>{_e(label)}</h3>' if len(labels) > 1 else ''
        sections['summary'].append(head + _summary(label, status, results, config))
        sections['registration'].append(head + _figures(output_dir, label, 'registration'))
        seg_html = ''.join(f'<h3>{seg.capitalize()}{" (" + _e(label) + ")" if head else ""}'
                           f'</h3>' + _figures(output_dir, label, seg) for seg in SEGS
                           if seg in results or any(
                               (output_dir / label.split('_')[0] / 'figures').glob(
                                   f'{label}_seg-{seg}_dseg.svg')))
        sections['segmentation'].append(seg_html or '<p>No segmentation was written.</p>')
        vols = ''.join(f'<div><h3>{seg.capitalize()}</h3>{_volume_table(seg, r["rows"])}</div>'
                       for seg, r in results.items())
        sections['volumes'].append(head + (f'<div class="cols">{vols}</div>' if vols else
                                           '<p>No volume table.</p>'))
        sections['qc'].append(head + _flags_html(flags))
        sections['errors'].append(head + _errors_html(folder))
        methods = methods or (_methods(results) if results else '')
    titles = {'summary': 'Summary', 'registration': 'Registration checks',
              'segmentation': 'Segmentation (native space)', 'volumes': 'Volumes',
              'qc': 'Quality-control flags', 'errors': 'Errors'}
    for key in ('summary', 'registration', 'segmentation', 'volumes', 'qc'):
        body.append(f'<h2 id="{key}">{titles[key]}</h2>' + '\n'.join(sections[key]))
    body.append('<h2 id="methods">Methods</h2>' + (methods or '<p>No results yet.</p>'))
    body.append('<h2 id="errors">Errors</h2>' + '\n'.join(sections['errors']))
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>sub-{_e(subject)}: cerebseg</title><style>{_CSS}</style></head><body>'
            f'<nav>{"".join(nav)}</nav><main>' + '\n'.join(body) + '</main></body></html>\n')
    out = output_dir / f'sub-{subject}.html'
    atomic_write_text(out, page)
    LOGGER.info('Report written: %s', out)
    return out


def write_status(output_dir, run, log_dir: Path, *, started: datetime, code: int, message: str,
                 device: str, run_uuid: str, qc_flags: list[dict]) -> Path:
    """``sub-X/log/<run_uuid>/<label>_status.json``: how the run ended (read by the reports
    and the group level)."""
    finished = datetime.now(timezone.utc)
    status = {'label': run.label, 'subject': run.subject, 'session': run.session,
              'exit_code': int(code), 'message': message,
              'started': started.isoformat(timespec='seconds'),
              'finished': finished.isoformat(timespec='seconds'),
              'elapsed_s': round((finished - started).total_seconds(), 1), 'device': device,
              'version': __version__, 'run_uuid': run_uuid, 'qc_flags': qc_flags,
              'host_cpus': os.cpu_count()}
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(log_dir) / f'{run.label}_status.json',
                             json.dumps(status, indent=2) + '\n')
