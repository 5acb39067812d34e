"""Build the templates and atlas libraries from public source files (``cerebseg-assets build``).

Each library entry is a template T1w (and T2w where the source has one) with its cerebellar
label map, put on the working grid by an affine registration of the template to
MNI152NLin2009cAsym. Affine only, on purpose: each entry keeps its own anatomy, and the
nonlinear part is done per subject. Labels are carried with ANTs' ``genericLabel``
interpolation (Gaussian-weighted label voting), not nearest neighbour, so thin lobules survive
the change from 1 mm to 0.5 mm.
"""
from __future__ import annotations

import colorsys
import csv
import json
import logging
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from cerebseg import __version__
from cerebseg.assets import (ASSETS_FORMAT, DEFAULT_BUILD, LUT_NAME, MANIFEST, TEMPLATE_BRAIN,
                             TEMPLATE_HEAD, TEMPLATE_MASK, package_json)
from cerebseg.assets.sources import lut_to_tsv, source_path
from cerebseg.errors import MissingAssetError
from cerebseg.utils.grid import WORKING_GRID, BoxGrid
from cerebseg.utils.images import (ants_to_nib, atomic_save, atomic_write_text, nib_to_ants,
                                   sha256sum, to_label_image)
from cerebseg.utils.preproc import masked_correlation, normalise_intensity
from cerebseg.utils.registration import ants_seed, identity_transform

LOGGER = logging.getLogger('cerebseg.assets.build')

_ABBREVIATIONS = {'Left': 'L', 'Right': 'R', 'Vermis': 'V'}


def abbreviate(name: str) -> str:
    """``Left_CrusI`` -> ``L-CrusI``; ``Vermis_VI`` -> ``V-VI``."""
    parts = name.replace(' ', '_').split('_')
    return '-'.join(_ABBREVIATIONS.get(p, p) for p in parts if p)


def _palette(n: int) -> list[str]:
    cols = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
        cols.append('#%02x%02x%02x' % (int(r * 255), int(g * 255), int(b * 255)))
    return cols


def read_lut(sources: Path, protocol: dict) -> tuple[list[dict], dict[int, int]]:
    """The protocol's lookup table (with background 0) and the source-value -> index map."""
    spec = protocol['lut']
    path = source_path(sources, spec['file'])
    delimiter = ';' if spec['format'] == 'csv;' else ('\t' if spec['format'] == 'tsv' else ',')
    with open(path, newline='', encoding='utf-8') as fobj:
        rows = list(csv.DictReader(fobj, delimiter=delimiter))
    by_value = {int(r[spec['index']]): r for r in rows}
    wanted = sorted(by_value) if protocol['labels'] == 'all' else list(protocol['labels'])
    colors = _palette(len(wanted))
    lut = [{'index': 0, 'name': 'background', 'abbreviation': 'BG', 'color': '#000000'}]
    mapping = {}
    for new, value in enumerate(wanted, start=1):
        if value not in by_value:
            raise MissingAssetError(f'Label {value} of protocol {protocol["name"]!r} is not in '
                                    f'{path}.')
        row = by_value[value]
        name = row[spec['name']].strip().replace(' ', '_')
        color = row.get(spec['color']) if spec.get('color') else None
        lut.append({'index': new, 'name': name, 'abbreviation': abbreviate(name),
                    'color': color or colors[new - 1]})
        mapping[value] = new
    return lut, mapping


def relabel(data: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Source label values -> protocol indices; values not in ``mapping`` become 0."""
    data = np.asarray(np.rint(data), dtype=np.int64)
    table = np.zeros(max(int(data.max()), max(mapping)) + 1, dtype=np.int16)
    for src, dst in mapping.items():
        table[src] = dst
    data = np.clip(data, 0, None)
    return table[data]


def entry_labels(sources: Path, protocol_name: str, entry_name: str) -> nib.Nifti1Image:
    """A template entry's atlas in its own space, in the protocol's indices."""
    protocol = package_json(f'protocols/{protocol_name}.json')
    entry = next((e for e in protocol['entries'] if e['name'] == entry_name), None)
    if entry is None or 'dseg' not in entry:
        raise MissingAssetError(f'Protocol {protocol_name!r} has no template entry '
                                f'{entry_name!r}.')
    _, mapping = read_lut(sources, protocol)
    src = nib.load(source_path(sources, entry['dseg']))
    return nib.Nifti1Image(relabel(np.asarray(src.dataobj), mapping), src.affine)


def build_templates(sources: Path, out: Path) -> dict:
    """Copy the 1 mm MNI152NLin2009cAsym templates (head, brain) and derive the brain mask."""
    spec = package_json('templates.json')
    head = nib.load(source_path(sources, spec['head']))
    brain = nib.load(source_path(sources, spec['brain']))
    if head.shape != brain.shape or not np.allclose(head.affine, brain.affine):
        raise MissingAssetError('The whole-head and brain templates are not on the same grid.')
    brain_data = np.asarray(brain.dataobj, dtype=np.float32)
    mask = (brain_data > 0).astype(np.uint8)
    atomic_save(nib.Nifti1Image(np.asarray(head.dataobj, np.float32), head.affine),
                out / TEMPLATE_HEAD)
    atomic_save(nib.Nifti1Image(brain_data, brain.affine), out / TEMPLATE_BRAIN)
    atomic_save(nib.Nifti1Image(mask, brain.affine), out / TEMPLATE_MASK)
    icv_ml = float(mask.sum() * np.prod(brain.header.get_zooms()[:3]) / 1000.0)
    return {'space': spec['space'], 'head': TEMPLATE_HEAD, 'brain': TEMPLATE_BRAIN,
            'mask': TEMPLATE_MASK, 'brain_mask_volume_ml': icv_ml}


def build_entry(entry: dict, mapping: dict[int, int], sources: Path, out: Path,
                grid: BoxGrid, template_head, seed: int = 0) -> dict:
    """Register one library template to MNI152NLin2009cAsym (affine), resample it on ``grid``."""
    import ants

    t1_src = nib.load(source_path(sources, entry['t1w']))
    dseg_src = nib.load(source_path(sources, entry['dseg']))
    moving = nib_to_ants(t1_src)
    labels = nib.Nifti1Image(relabel(np.asarray(dseg_src.dataobj), mapping), dseg_src.affine)
    # The template's cerebellum lies inside the working box: register to the 1 mm box of
    # the MNI template so that the fit is driven by cerebellum and brainstem.
    box1 = ants.resample_image_to_target(template_head, grid.reference(1.0), 'linear')
    with ants_seed(seed), tempfile.TemporaryDirectory() as tmp:
        # all sources are in MNI-like coordinates: start from identity
        identity = identity_transform(str(Path(tmp) / 'identity.mat'))
        reg = ants.registration(box1, moving, type_of_transform='Affine',
                                initial_transform=identity, outprefix=str(Path(tmp) / 'aff_'))
        ref = grid.reference()
        t1 = ants.apply_transforms(ref, moving, reg['fwdtransforms'], interpolator='linear')
        dseg = ants.apply_transforms(ref, nib_to_ants(labels), reg['fwdtransforms'],
                                     interpolator='genericLabel')
        t2 = None
        if entry.get('t2w'):
            t2_src = nib.load(source_path(sources, entry['t2w']))
            t2 = ants.apply_transforms(ref, nib_to_ants(t2_src), reg['fwdtransforms'],
                                       interpolator='linear')
        warped1 = ants.apply_transforms(box1, moving, reg['fwdtransforms'])
        corr = masked_correlation(warped1.numpy(), box1.numpy(), warped1.numpy() > 0)
    name = entry['name']
    files = {'t1w': f'entry-{name}_T1w.nii.gz', 'dseg': f'entry-{name}_dseg.nii.gz'}
    atomic_save(ants_to_nib(t1.new_image_like(normalise_intensity(t1.numpy()))),
                out / files['t1w'])
    atomic_save(to_label_image(np.rint(dseg.numpy()), grid.affine), out / files['dseg'])
    if t2 is not None:
        files['t2w'] = f'entry-{name}_T2w.nii.gz'
        atomic_save(ants_to_nib(t2.new_image_like(normalise_intensity(t2.numpy()))),
                    out / files['t2w'])
    cereb_ml = float((dseg.numpy() > 0).sum() * grid.spacing ** 3 / 1000.0)
    LOGGER.info('Library entry %s: correlation with the MNI box %.3f, labelled volume %.1f mL',
                name, corr, cereb_ml)
    return {'name': name, 'files': files, 'affine_correlation': round(corr, 4),
            'labelled_volume_ml': round(cereb_ml, 2),
            'sources': {k: entry[k] for k in ('t1w', 't2w', 'dseg') if entry.get(k)}}


def build_manual_entry(entry: dict, protocol: dict, sources: Path, out: Path, grid: BoxGrid,
                       seed: int = 0) -> dict:
    """A library entry of real individual anatomy from a manual lobule map without an image
    (``entry['manual']``): the map put into the protocol's template entry ``entry['into']``
    and its cerebellum painted from the labels (:mod:`cerebseg.assets.manual`), on ``grid``.
    The template is MNI152NLin2009cAsym, so no registration to it is needed."""
    import ants

    from cerebseg.assets.manual import (TEMPLATE_LEVELS, detail_image, place_in_template,
                                        read_manual_map)

    into = next((e for e in protocol['entries'] if e['name'] == entry['into']), None)
    if into is None or 'manual' in into:
        raise MissingAssetError(f'Library entry {entry["name"]!r}: "into" must name a template '
                                f'entry of protocol {protocol["name"]!r}.')
    template_labels = entry_labels(sources, protocol['name'], into['name'])
    head = nib.load(source_path(sources, into['t1w']))
    placed = place_in_template(read_manual_map(source_path(sources, entry['manual'])), head,
                               template_labels, seed=seed)
    detail = detail_image(placed, TEMPLATE_LEVELS)
    ref = grid.reference()
    # the 0.3 mm painting averaged onto the 0.5 mm grid (Gaussian of a 0.5 mm box's width)
    fine = ants.smooth_image(nib_to_ants(detail), 0.2, sigma_in_physical_coordinates=True)
    t1 = ants.resample_image_to_target(fine, ref, 'linear').numpy()
    vox = np.indices(ref.shape).reshape(3, -1).astype(float)
    world = grid.affine[:3, :3] @ vox + grid.affine[:3, 3:4]
    far = detail.affine[:3, :3] @ (np.array(detail.shape) - 1) + detail.affine[:3, 3]
    inside = np.all([(w >= lo) & (w <= hi) for w, lo, hi in
                     zip(world, detail.affine[:3, 3], far)], axis=0)
    coarse = ants.resample_image_to_target(nib_to_ants(placed.head), ref, 'linear').numpy()
    t1 = np.where(inside.reshape(ref.shape), t1, coarse)
    dseg = ants.resample_image_to_target(nib_to_ants(placed.labels), ref, 'genericLabel')
    name = entry['name']
    files = {'t1w': f'entry-{name}_T1w.nii.gz', 'dseg': f'entry-{name}_dseg.nii.gz'}
    atomic_save(nib.Nifti1Image(normalise_intensity(t1.astype(np.float32)), grid.affine),
                out / files['t1w'])
    atomic_save(to_label_image(np.rint(dseg.numpy()), grid.affine), out / files['dseg'])
    cereb_ml = float((dseg.numpy() > 0).sum() * grid.spacing ** 3 / 1000.0)
    LOGGER.info('Library entry %s (manual labels, painted): labelled volume %.1f mL, scaled '
                'x%.3f into %s', name, cereb_ml, placed.scale, into['name'])
    return {'name': name, 'files': files, 'labelled_volume_ml': round(cereb_ml, 2),
            'manual_labels': True, 'scale_to_template': round(placed.scale, 4),
            'sources': {'dseg': entry['manual'], 'template': into['t1w']}}


def mirror_entry(entry: dict, lib_dir: Path, swap: np.ndarray, affine: np.ndarray) -> dict:
    """The left-right mirror of a built entry (x -> -x about the box's midline, x = 0 mm of the
    template; left and right labels swapped), written beside it as ``<name>Mirror``.

    A library holding every entry and its mirror has no left-right preference of its own, so a
    mirrored subject gets mirrored labels (issue 9: without it, a real T1w and its mirror
    agreed with mean Dice 0.84 over labels: the templates' asymmetry set the boundaries).
    """
    name = f'{entry["name"]}Mirror'
    files = {}
    for kind, rel in entry['files'].items():
        img = nib.load(lib_dir / rel)
        data = np.asarray(img.dataobj)[::-1]
        files[kind] = rel.replace(f'entry-{entry["name"]}_', f'entry-{name}_')
        if kind == 'dseg':
            atomic_save(to_label_image(swap[data.astype(np.int64)], affine), lib_dir / files[kind])
        else:
            atomic_save(nib.Nifti1Image(np.ascontiguousarray(data, np.float32), affine),
                        lib_dir / files[kind])
    return {**entry, 'name': name, 'files': files, 'mirror_of': entry['name']}


def build_library(protocol_name: str, sources: Path, out: Path, grid: BoxGrid,
                  template_head, seed: int = 0, mirror: bool = True,
                  skip_entries=()) -> dict:
    from cerebseg.utils.labels import swap_classes

    protocol = package_json(f'protocols/{protocol_name}.json')
    lib_dir = out / protocol_name
    lib_dir.mkdir(parents=True, exist_ok=True)
    lut, mapping = read_lut(sources, protocol)
    atomic_write_text(lib_dir / LUT_NAME, lut_to_tsv(lut))
    entries = [build_manual_entry(e, protocol, sources, lib_dir, grid, seed)
               if 'manual' in e else
               build_entry(e, mapping, sources, lib_dir, grid, template_head, seed)
               for e in protocol['entries'] if e['name'] not in skip_entries]
    if mirror:
        if not np.isclose(grid.origin[0] + (grid.shape[0] - 1) * grid.spacing, -grid.origin[0]):
            raise ValueError('The working grid is not symmetric about x = 0: cannot mirror.')
        swap = swap_classes([[r['index'], r['name']] for r in lut])
        entries += [mirror_entry(e, lib_dir, swap, grid.affine) for e in entries]
    for e in entries:
        e['files'] = {k: f'{protocol_name}/{v}' for k, v in e['files'].items()}
    library = {'name': protocol_name, 'description': protocol['description'],
               'citation': protocol['citation'], 'licence': protocol['licence'],
               'lut': f'{protocol_name}/{LUT_NAME}', 'n_labels': len(lut), 'entries': entries}
    if protocol.get('lobule_votes'):
        library['lobule_votes'] = build_vote_entries(protocol, sources, out, grid,
                                                     template_head, seed, mirror, skip_entries)
    return library


def unit_mapping(sources: Path, votes: dict) -> tuple[dict, dict[int, int]]:
    """The voting protocol and its source label value -> unit map (``votes['units']``: the
    unit of each label name without its ``Left_``/``Right_``/``Vermis_`` prefix; other labels,
    such as nuclei, 0)."""
    protocol = package_json(f'protocols/{votes["protocol"]}.json')
    lut, mapping = read_lut(sources, protocol)
    names = {row['index']: row['name'] for row in lut}
    out = {}
    for value, index in mapping.items():
        stem = names[index].split('_', 1)
        stem = stem[1] if len(stem) == 2 and stem[0] in ('Left', 'Right', 'Vermis') else stem[0]
        out[value] = int(votes['units'].get(stem, 0))
    if sorted(set(out.values()) - {0}) != sorted(set(votes['units'].values())):
        raise MissingAssetError(f'The {votes["protocol"]!r} lookup table does not name every '
                                f'unit of the lobule votes ({sorted(votes["units"])}).')
    return protocol, out


def build_vote_entries(protocol: dict, sources: Path, out: Path, grid: BoxGrid, template_head,
                       seed: int = 0, mirror: bool = True, skip_entries=()) -> dict:
    """The entries of ``protocol['lobule_votes']``: another protocol's templates whose labels
    are the lobule units (sides merged), written into the library's folder (with mirrors), for
    :func:`cerebseg.utils.branches.relabel_by_branches`'s ``votes``."""
    votes = protocol['lobule_votes']
    source, mapping = unit_mapping(sources, votes)
    lib_dir = out / protocol['name']
    entries = []
    for name in votes['entries']:
        spec = next((e for e in source['entries'] if e['name'] == name), None)
        if spec is None:
            raise MissingAssetError(f'Protocol {votes["protocol"]!r} has no entry {name!r} '
                                    f'(lobule votes of {protocol["name"]!r}).')
        vote_name = f'{votes["protocol"]}-{name}'
        if vote_name in skip_entries:
            continue
        entries.append(build_entry({**spec, 'name': vote_name}, mapping, sources, lib_dir,
                                   grid, template_head, seed))
    n_units = max(votes['units'].values()) + 1
    if mirror:
        entries += [mirror_entry(e, lib_dir, np.arange(n_units), grid.affine) for e in entries]
    for e in entries:
        e['files'] = {k: f'{protocol["name"]}/{v}' for k, v in e['files'].items()}
    return {'protocol': votes['protocol'], 'weight': float(votes['weight']),
            'n_labels': n_units, 'entries': entries}


def build_assets(sources: str | Path, out: str | Path, libraries=DEFAULT_BUILD,
                 grid: BoxGrid = WORKING_GRID, seed: int = 0, mirror: bool = True,
                 brainstem: bool = True, brainstem_navigator: str | Path | None = None,
                 skip_entries=()) -> Path:
    """Build every asset into ``out`` and write its manifest last (so a half build never loads).

    ``brainstem`` adds the brainstem label set (manifest section ``brainstem``, files in
    ``out/brainstem``); ``brainstem_navigator`` (a user's Brainstem Navigator folder) extends it
    with the Navigator's nuclei and marks the whole assets folder restricted.
    ``skip_entries``: names of library entries not to build (tests: a library without the
    manual map a case is made from).
    """
    from cerebseg.assets.brainstem_atlas import build_brainstem
    from cerebseg.assets.reference import build_reference

    sources, out = Path(sources), Path(out)
    if brainstem_navigator and not brainstem:
        raise ValueError('A Brainstem Navigator folder needs the brainstem label set: '
                         'drop --no-brainstem or --brainstem-navigator.')
    out.mkdir(parents=True, exist_ok=True)
    stale = out / MANIFEST
    if stale.exists():
        stale.unlink()
    manifest = {'format': ASSETS_FORMAT, 'cerebseg_version': __version__,
                'grid': grid.to_dict(), 'templates': build_templates(sources, out),
                'libraries': {}, 'restricted': bool(brainstem_navigator)}
    template_head = nib_to_ants(nib.load(out / TEMPLATE_HEAD))
    for name in libraries:
        LOGGER.info('Building atlas library %r', name)
        manifest['libraries'][name] = build_library(name, sources, out, grid, template_head,
                                                    seed, mirror, skip_entries)
    manifest['reference'] = build_reference(sources, out)
    if brainstem:
        LOGGER.info('Building the brainstem label set')
        manifest['brainstem'] = build_brainstem(sources, out, seed=seed,
                                                navigator=brainstem_navigator)
    manifest['files'] = {str(p.relative_to(out)): sha256sum(p)
                         for p in sorted(out.rglob('*')) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + '\n')
    return out / MANIFEST


def leave_out_entry(assets: Path, out: Path, entry: str | list[str]) -> Path:
    """An assets folder at ``out`` whose libraries lack ``entry`` (one name or several) and
    their mirrors; the other files are links to ``assets``. For leave-one-template-out
    validation: a case made from a template is segmented without that template in the
    library."""
    assets, out = Path(assets), Path(out)
    names = {entry} if isinstance(entry, str) else set(entry)
    manifest = json.loads((assets / MANIFEST).read_text())
    gone = set()
    for lib in manifest['libraries'].values():
        left_out = [e for e in lib['entries']
                    if names & {e['name'], e.get('mirror_of')}]
        gone.update(rel for e in left_out for rel in e['files'].values())
        lib['entries'] = [e for e in lib['entries'] if e not in left_out]
    if not gone:
        raise ValueError(f'No library entry {entry!r} in {assets}')
    manifest['files'] = {k: v for k, v in manifest['files'].items() if k not in gone}
    for rel in manifest['files']:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to((assets / rel).resolve())
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + '\n')
    return out
