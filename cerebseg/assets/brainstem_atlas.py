"""The brainstem label set: midbrain / pons / medulla x grey / white matter, plus nuclei.

:func:`build_label_set` composes it from open atlases in their own space, FSL MNI152NLin6Asym
1 mm, as the data-driven protocol ``cerebseg/data/protocols/brainstem.json`` says:

* outline: Harvard-Oxford sub-cortical (max-prob, thr 25 %) Brain-Stem, completed by the
  Hammersmith brainstem where that is midbrain: Harvard-Oxford follows the CMA convention, whose
  ventral diencephalon (a label it lacks) takes the cerebral peduncles, substantia nigra and red
  nucleus, so its brain stem alone holds none of the CIT168 red nucleus;
* part: each outline voxel takes the part (midbrain, pons, medulla) of the nearest Talairach
  brainstem voxel; below the Talairach floor (z = -47 mm) the outline is medulla;
* tissue: grey matter where the ICBM 2009a symmetric grey-matter probability exceeds the
  white-matter one. These maps are in MNI152NLin2009aSym; their world coordinates are used as
  MNI152NLin6Asym coordinates without registration (both are MNI152 averages);
* nuclei (CIT168, AAL3), painted over the tissue labels in protocol order and clipped to the
  outline; a user-supplied Brainstem Navigator folder adds its nuclei and replaces the
  open-atlas nucleus of the same structure.

Every source is sampled in world (mm) coordinates: grids that share a name differ in flip and
origin (FSL LAS, origin +90 mm, against TemplateFlow RAS, origin -91 mm).

:func:`build_brainstem` carries the label set into the pipeline's frame, MNI152NLin2009cAsym,
by an ANTs SyN of the FSL MNI152 T1 onto the ICBM 2009c brain template, and writes it on
:data:`~cerebseg.utils.grid.BRAINSTEM_GRID` with the template T1 and the lookup table.
"""
from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from cerebseg.assets import (
    BRAINSTEM_DIR,
    BRAINSTEM_DSEG,
    BRAINSTEM_LUT,
    BRAINSTEM_T1W,
    package_json,
)
from cerebseg.assets.sources import lut_to_tsv, source_path
from cerebseg.errors import MissingAssetError
from cerebseg.utils.brainstem_parts import PARTS
from cerebseg.utils.grid import BRAINSTEM_GRID, BoxGrid
from cerebseg.utils.images import atomic_save, atomic_write_text, to_label_image
from cerebseg.utils.labels import side as side_of
from cerebseg.utils.labels import swap_classes

LOGGER = logging.getLogger('cerebseg.assets.brainstem_atlas')

PROTOCOL = 'protocols/brainstem.json'
#: the columns of the brainstem lookup table
LUT_COLUMNS = ('index', 'name', 'abbreviation', 'color', 'part', 'source', 'licence')
#: the SyN is fitted in the brainstem box grown by this much (mm)
REGISTRATION_MARGIN_MM = 12.0
#: SyN iterations at 4, 2 and 1 mm
SYN_ITERATIONS = (40, 20, 10)
RESTRICTED_WARNING = (
    'These assets contain Brainstem Navigator labels (from {dir}). Its licence forbids '
    'redistributing the Navigator files or anything derived from them: these assets, and any '
    'weights trained on them, must stay on this machine. Do not share or upload them, and do not '
    'bake them into a container image.')
_SIDES = {-1: 'Left', 1: 'Right'}


def sample(img: nib.spatialimages.SpatialImage, grid: BoxGrid, order: int = 0) -> np.ndarray:
    """The values of ``img`` at the voxel centres of ``grid``, located in world (mm) coordinates.

    ``order`` 0 is nearest neighbour (labels), 1 trilinear (probabilities); 0 outside ``img``.
    """
    from scipy import ndimage

    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    vox = np.linalg.inv(img.affine) @ grid.affine
    ijk = np.indices(grid.shape, dtype=np.float64).reshape(3, -1)
    coords = vox[:3, :3] @ ijk + vox[:3, 3:]
    if order == 0:
        coords = np.rint(coords)
    out = ndimage.map_coordinates(data, coords, order=order, mode='constant', cval=0.0)
    return out.reshape(grid.shape)


def world_coords(grid: BoxGrid, axis: int) -> np.ndarray:
    """World coordinate (mm) of the voxel centres of ``grid`` along ``axis``."""
    return grid.origin[axis] + grid.spacing * np.arange(grid.shape[axis])


def box_around(points: np.ndarray, margin_mm: float) -> BoxGrid:
    """A 1 mm RAS box on the integer-mm lattice holding the world ``points`` (N, 3) with
    ``margin_mm`` on every side, symmetric about x = 0 (so that a voxel flip mirrors it)."""
    lo = np.floor(points.min(axis=0) - margin_mm)
    hi = np.ceil(points.max(axis=0) + margin_mm)
    half_x = max(-lo[0], hi[0])
    lo[0], hi[0] = -half_x, half_x
    return BoxGrid(origin=tuple(float(v) for v in lo),
                   extent=tuple(float(v) for v in hi - lo + 1), spacing=1.0)


def _world_points(img: nib.spatialimages.SpatialImage, values) -> np.ndarray:
    """World coordinates (mm) of the voxels of ``img`` holding one of ``values``."""
    mask = np.isin(np.rint(np.asarray(img.dataobj)), values)
    return nib.affines.apply_affine(img.affine, np.argwhere(mask))


def validate_protocol(protocol: dict) -> None:
    """Raise :class:`ValueError` naming the first inconsistency of a brainstem protocol."""
    for key in ('sources', 'outline', 'parts', 'tissue', 'labels'):
        if key not in protocol:
            raise ValueError(f'Brainstem protocol {protocol.get("name")!r} lacks {key!r}.')
    sources = protocol['sources']
    used = [protocol['outline']['source'], protocol['parts']['source'],
            protocol['tissue']['gm'], protocol['tissue']['wm']]
    extend = protocol['outline'].get('extend')
    if extend:
        used.append(extend['source'])
        if extend.get('part') not in PARTS:
            raise ValueError(f'Brainstem protocol: the outline extension needs a part of {PARTS}.')
    seen_idx, seen_name = set(), set()
    for row in protocol['labels']:
        where = f'label {row.get("index")} ({row.get("name")!r})'
        for key in ('index', 'name', 'abbreviation', 'color', 'kind', 'part'):
            if key not in row:
                raise ValueError(f'Brainstem protocol: {where} lacks {key!r}.')
        if not isinstance(row['index'], int) or not 0 < row['index'] < 100:
            raise ValueError(f'Brainstem protocol: {where}: indices must be 1..99 '
                             '(100 and above are for Brainstem Navigator labels).')
        if row['index'] in seen_idx or row['name'].lower() in seen_name:
            raise ValueError(f'Brainstem protocol: {where} is not unique.')
        seen_idx.add(row['index'])
        seen_name.add(row['name'].lower())
        if row['part'] not in PARTS:
            raise ValueError(f'Brainstem protocol: {where}: part must be one of {PARTS}.')
        if row['kind'] == 'tissue':
            if row.get('tissue') not in ('gm', 'wm'):
                raise ValueError(f'Brainstem protocol: {where}: tissue must be gm or wm.')
        elif row['kind'] == 'nucleus':
            if not row.get('values'):
                raise ValueError(f'Brainstem protocol: {where}: a nucleus needs source values.')
            used.append(row.get('source'))
        else:
            raise ValueError(f'Brainstem protocol: {where}: kind must be tissue or nucleus.')
        if not str(row['color']).startswith('#') or len(row['color']) != 7:
            raise ValueError(f'Brainstem protocol: {where}: color must be #rrggbb.')
    for key in used:
        if key not in sources or 'file' not in sources[key]:
            raise ValueError(f'Brainstem protocol: source {key!r} is not in "sources".')
    for part in PARTS:
        if not protocol['parts']['values'].get(part):
            raise ValueError(f'Brainstem protocol: no source values for the {part}.')
    swap_classes([[r['index'], r['name']] for r in protocol['labels']])


def read_navigator(directory: Path, spec: dict) -> list[dict]:
    """The Navigator folder's nuclei: ``[{'value', 'stem', 'side', 'path'}, ...]``."""
    directory = Path(directory)
    lookup = directory / spec['lookup']
    if not lookup.is_file():
        raise MissingAssetError(
            f'Brainstem Navigator lookup table missing: {lookup}. Pass --brainstem-navigator the '
            'folder holding the Navigator masks in MNI152NLin6Asym (<name>.nii.gz) and '
            f'{spec["lookup"]}.')
    with open(lookup, newline='', encoding='utf-8') as fobj:
        rows = list(csv.DictReader(fobj))
    if not rows or not {'Region_Index', 'Region_Name'} <= set(rows[0]):
        raise MissingAssetError(f'{lookup} needs the columns Region_Index and Region_Name.')
    nuclei = []
    for row in rows:
        name = row['Region_Name'].strip()
        path = directory / f'{name}.nii.gz'
        if not path.is_file():
            raise MissingAssetError(f'Brainstem Navigator mask missing: {path} (listed in '
                                    f'{lookup}). Copy the complete Navigator folder.')
        low = name.lower()
        sided = -1 if low.endswith('_l') else (1 if low.endswith('_r') else 0)
        nuclei.append({'value': int(row['Region_Index']), 'side': sided, 'path': path,
                       'stem': name[:-2] if sided else name})
    return nuclei


class _Composer:
    """Paints labels into one box and logs what each of them keeps."""

    def __init__(self, grid: BoxGrid, outline: np.ndarray, parts: np.ndarray,
                 tissue: list[int]):
        self.grid, self.outline, self.parts = grid, outline, parts
        self.tissue = np.asarray(tissue, dtype=np.int16)
        self.dseg = np.zeros(grid.shape, np.int16)
        self.x = world_coords(grid, 0)[:, None, None]

    def paint(self, row: dict, mask: np.ndarray, origin: str) -> None:
        total = int(mask.sum())
        if total == 0:
            raise MissingAssetError(f'{row["name"]}: no voxel of {origin} in the brainstem box '
                                    '(wrong values in brainstem.json, or not that atlas?).')
        centroid = float(np.broadcast_to(self.x, mask.shape)[mask].mean())
        side = side_of(row['name'])
        if side and np.sign(centroid) != side:
            raise ValueError(
                f'{row["name"]} from {origin} has its centroid at x = {centroid:+.1f} mm, on the '
                f'{"left" if centroid < 0 else "right"} (x < 0 is left): the source\'s left and '
                'right are swapped. Swap its values in cerebseg/data/protocols/brainstem.json.')
        kept = mask & self.outline
        covered = int(((self.dseg > 0) & kept & ~np.isin(self.dseg, self.tissue)).sum())
        self.dseg[kept] = row['index']
        part_code = PARTS.index(row['part']) + 1
        in_part = float((self.parts[kept] == part_code).mean()) if kept.any() else 0.0
        LOGGER.info('%s (%s): %d voxels, %.0f %% inside the outline, centroid x %+.1f mm, '
                    '%.0f %% in the %s%s', row['name'], origin, total, 100.0 * kept.sum() / total,
                    centroid, 100.0 * in_part, row['part'],
                    f', overwrites {covered} voxels of other nuclei' if covered else '')


def _navigator_rows(nuclei: list[dict], spec: dict, composer: _Composer, start: int) -> list:
    """Paint the Navigator's masks; their part is the part most of their voxels lie in."""
    rows = []
    for k, nucleus in enumerate(nuclei):
        img = nib.load(nucleus['path'])
        mask = sample(img, composer.grid, 0) > 0.5
        side = nucleus['side']
        name = f'{_SIDES[side]}_{nucleus["stem"]}' if side else nucleus['stem']
        kept = mask & composer.outline
        if not kept.any():
            LOGGER.warning('Brainstem Navigator %s: no voxel inside the brainstem outline; '
                           'left out', nucleus['path'])
            continue
        part = PARTS[int(np.bincount(composer.parts[kept], minlength=4)[1:].argmax())]
        row = {'index': spec['index_offset'] + nucleus['value'], 'name': name,
               'abbreviation': f'{_SIDES[side][0]}-{nucleus["stem"]}' if side else nucleus['stem'],
               'color': _navigator_colour(start + k), 'kind': 'nucleus', 'part': part,
               'source': spec['source'], 'licence': spec['licence'], 'restricted': True}
        composer.paint(row, mask, f'{nucleus["path"].name}')
        rows.append(row)
    return rows


def _navigator_colour(i: int) -> str:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.9)
    return '#' + ''.join(f'{int(c * 255):02x}' for c in (r, g, b))


def _outline_and_parts(protocol: dict, load) -> tuple[BoxGrid, np.ndarray, np.ndarray]:
    """The box, the outline mask and the part code (1 midbrain, 2 pons, 3 medulla, 0 outside).

    ``load(key)`` returns the image of the protocol's source ``key``.
    """
    from scipy import ndimage

    srcs = protocol['sources']
    spec = protocol['outline']
    outline_img = load(spec['source'])
    points = [_world_points(outline_img, spec['values'])]
    extend = spec.get('extend')
    if extend:
        points.append(_world_points(load(extend['source']), extend['values']))
    for pts, key in zip(points, (spec['source'], extend and extend['source'])):
        if not len(pts):
            raise MissingAssetError(f'{srcs[key]["file"]} has no voxel with the outline values '
                                    'of cerebseg/data/protocols/brainstem.json: wrong atlas?')
    grid = box_around(np.vstack(points), float(protocol.get('margin_mm', 8)))
    outline = np.isin(np.rint(sample(outline_img, grid, 0)), spec['values'])

    spec = protocol['parts']
    tal = load(spec['source'])
    tal_box = np.rint(sample(tal, grid, 0))
    codes = np.zeros(grid.shape, np.uint8)
    for code, part in enumerate(PARTS, start=1):
        codes[np.isin(tal_box, spec['values'][part])] = code
    if not codes.any():
        raise MissingAssetError(f'{srcs[spec["source"]]["file"]} has no brainstem values near '
                                'the outline: is it the Talairach atlas?')
    every = [v for part in PARTS for v in spec['values'][part]]
    floor = float(_world_points(tal, every)[:, 2].min())
    nearest = ndimage.distance_transform_edt(codes == 0, return_distances=False,
                                             return_indices=True)
    parts = codes[tuple(nearest)]
    below = (world_coords(grid, 2) < floor)[None, None, :]
    parts = np.where(below, PARTS.index(spec['below_floor']) + 1, parts)
    if extend:
        more = np.isin(np.rint(sample(load(extend['source']), grid, 0)), extend['values'])
        added = more & ~outline & (parts == PARTS.index(extend['part']) + 1)
        LOGGER.info('Outline: %s %s %d mm3, + %d mm3 of %s %s in the %s',
                    protocol['outline']['source'], protocol['outline']['values'],
                    int(outline.sum()), int(added.sum()), extend['source'], extend['values'],
                    extend['part'])
        outline = outline | added
    LOGGER.info('Brainstem outline: %d mm3; Talairach floor z = %.0f mm (%d outline voxels '
                'below it are %s)', outline.sum(), floor, int((outline & below).sum()),
                spec['below_floor'])
    return grid, outline, np.where(outline, parts, 0).astype(np.uint8)


def build_label_set(sources: str | Path, protocol: dict | None = None,
                    navigator: str | Path | None = None) -> tuple[nib.Nifti1Image, list[dict]]:
    """The brainstem label map in MNI152NLin6Asym and its lookup table.

    Parameters
    ----------
    sources
        folder with the public source files (layout of ``cerebseg/data/sources.json``).
    protocol
        a brainstem protocol (default: ``cerebseg/data/protocols/brainstem.json``).
    navigator
        optional user-supplied Brainstem Navigator folder (restricted licence).

    Returns
    -------
    The int16 label image on the FSL MNI152NLin6Asym 1 mm lattice (RAS, voxel centres at integer
    mm), cropped to a box around the outline with ``margin_mm`` on every side (padded with 0
    where the FSL grid ends, below z = -72 mm), symmetric about x = 0; and the lookup rows
    (background first) with the columns of :data:`LUT_COLUMNS`.
    """
    sources = Path(sources)
    protocol = protocol if protocol is not None else package_json(PROTOCOL)
    validate_protocol(protocol)
    srcs = protocol['sources']
    cache: dict[str, nib.spatialimages.SpatialImage] = {}

    def load(key: str):
        if key not in cache:
            cache[key] = nib.load(source_path(sources, srcs[key]['file']))
        return cache[key]

    grid, outline, parts = _outline_and_parts(protocol, load)

    spec = protocol['tissue']
    grey = sample(load(spec['gm']), grid, 1) > sample(load(spec['wm']), grid, 1)

    tissue_rows = [r for r in protocol['labels'] if r['kind'] == 'tissue']
    composer = _Composer(grid, outline, parts, [r['index'] for r in tissue_rows])
    for row in tissue_rows:
        code = PARTS.index(row['part']) + 1
        composer.dseg[(parts == code) & (grey if row['tissue'] == 'gm' else ~grey)] = row['index']

    nav_spec = protocol.get('navigator', {})
    nuclei = read_navigator(Path(navigator), nav_spec) if navigator else []
    present = {(n['side'], n['stem'].lower()) for n in nuclei}
    lut_rows = list(tissue_rows)
    for row in protocol['labels']:
        if row['kind'] != 'nucleus':
            continue
        side = side_of(row['name'])
        replaced = [s for s in row.get('navigator', []) if (side, s.lower()) in present]
        if replaced:
            LOGGER.info('%s: replaced by the Brainstem Navigator (%s)', row['name'],
                        ', '.join(replaced))
            continue
        values = np.rint(sample(load(row['source']), grid, 0))
        composer.paint(row, np.isin(values, row['values']),
                       f'{row["source"]} {row["values"]}')
        lut_rows.append(row)
    if nuclei:
        lut_rows += _navigator_rows(nuclei, nav_spec, composer, len(lut_rows))
        names = [r['name'].lower() for r in lut_rows]
        if len(set(names)) != len(names):
            raise ValueError('Brainstem Navigator label names collide with open-atlas labels: '
                             f'{sorted({n for n in names if names.count(n) > 1})}')

    try:
        swap_classes([[r['index'], r['name']] for r in lut_rows])
    except ValueError as err:
        raise ValueError(f'The brainstem label set cannot be mirrored: {err}. A Brainstem '
                         'Navigator folder must hold both sides of every lateral nucleus.'
                         ) from err
    lut = [{'index': 0, 'name': 'background', 'abbreviation': 'BG', 'color': '#000000',
            'part': 'n/a', 'source': 'n/a', 'licence': 'n/a'}]
    for row in sorted(lut_rows, key=lambda r: r['index']):
        lut.append({'index': row['index'], 'name': row['name'],
                    'abbreviation': row['abbreviation'], 'color': row['color'],
                    'part': row['part'], 'source': _source_text(row, protocol),
                    'licence': _licence_text(row, protocol),
                    'restricted': bool(row.get('restricted'))})
    img = to_label_image(composer.dseg, grid.affine)
    log_volumes(img, lut, 'MNI152NLin6Asym')
    return img, lut


def _outline_keys(protocol: dict) -> list[str]:
    spec = protocol['outline']
    return [spec['source']] + ([spec['extend']['source']] if spec.get('extend') else [])


def _source_text(row: dict, protocol: dict) -> str:
    """The LUT's ``source`` column: where a label's voxels come from."""
    if row.get('restricted'):
        return row['source']
    if row['kind'] == 'tissue':
        spec = protocol['outline']
        outline = f'{spec["source"]} {spec["values"]}'
        if spec.get('extend'):
            ext = spec['extend']
            outline += f' + {ext["source"]} {ext["values"]} ({ext["part"]})'
        return (f'outline {outline}; part {protocol["parts"]["source"]}; '
                f'tissue {protocol["tissue"]["gm"]} > {protocol["tissue"]["wm"]}')
    return f'{row["source"]} {row["values"]}'


def _licence_text(row: dict, protocol: dict) -> str:
    """The LUT's ``licence`` column: the licences of every source a label depends on."""
    srcs = protocol['sources']
    if row.get('restricted'):
        return row['licence']
    outline = '; '.join(dict.fromkeys(srcs[k]['licence'] for k in _outline_keys(protocol)))
    if row['kind'] == 'tissue':
        keys = _outline_keys(protocol) + [protocol['parts']['source'], protocol['tissue']['gm']]
        return '; '.join(dict.fromkeys(srcs[k]['licence'] for k in keys))
    return f'{srcs[row["source"]]["licence"]} (clipped to the outline: {outline})'


def label_volumes(img: nib.spatialimages.SpatialImage, lut: list[dict]) -> dict[str, float]:
    """Volume (mm3) of every label of ``lut`` (background left out)."""
    from cerebseg.utils.native import label_volumes as volumes

    vols = volumes(np.asarray(img.dataobj), img.header.get_zooms()[:3],
                   max(r['index'] for r in lut) + 1)
    return {r['name']: float(vols[r['index']]) for r in lut if r['index']}


def part_volumes(img: nib.spatialimages.SpatialImage, lut: list[dict]) -> dict[str, float]:
    """Midbrain, pons and medulla volumes (mm3): the sums of their labels' volumes."""
    vols = label_volumes(img, lut)
    return {part: sum(vols[r['name']] for r in lut if r.get('part') == part) for part in PARTS}


def log_volumes(img, lut: list[dict], space: str) -> None:
    vols = label_volumes(img, lut)
    for row in lut[1:]:
        LOGGER.info('%-28s %-8s %8.0f mm3 (%s)', row['name'], row['part'], vols[row['name']],
                    space)
    parts = part_volumes(img, lut)
    LOGGER.info('Brainstem %.0f mm3 in %s: %s', sum(parts.values()), space,
                ', '.join(f'{k} {v:.0f}' for k, v in parts.items()))


def lut_tsv(lut: list[dict]) -> str:
    """The lookup table as a BIDS ``dseg.tsv`` with :data:`LUT_COLUMNS`."""
    return lut_to_tsv(lut, columns=LUT_COLUMNS)


def carry_to_frame(labels: nib.spatialimages.SpatialImage, sources: Path, protocol: dict,
                   grid: BoxGrid = BRAINSTEM_GRID, seed: int = 0,
                   iterations: tuple[int, ...] = SYN_ITERATIONS):
    """The label set (MNI152NLin6Asym) and the ICBM 2009c brain on ``grid`` in MNI152NLin2009cAsym.

    An ANTs SyN (from identity) of the FSL MNI152 T1 brain onto the 2009c brain template, both
    cut to ``grid`` grown by :data:`REGISTRATION_MARGIN_MM`; the labels follow with
    ``genericLabel``. Returns (labels, T1, info) on ``grid``.
    """
    import ants

    from cerebseg.utils.images import ants_to_nib, nib_to_ants
    from cerebseg.utils.preproc import masked_correlation
    from cerebseg.utils.registration import ants_seed, identity_transform

    spec = protocol['registration']
    fixed_rel = package_json('templates.json')['brain']
    moving = nib_to_ants(nib.load(source_path(sources, spec['moving'])))
    fixed = nib_to_ants(nib.load(source_path(sources, fixed_rel)))
    grow = REGISTRATION_MARGIN_MM
    region = BoxGrid(origin=tuple(o - grow for o in grid.origin),
                     extent=tuple(e + 2 * grow for e in grid.extent), spacing=1.0).reference()
    fixed_r = ants.resample_image_to_target(fixed, region, 'linear')
    moving_r = ants.resample_image_to_target(moving, region, 'linear')
    ref = grid.reference()
    with ants_seed(seed), tempfile.TemporaryDirectory(prefix='cerebseg-brainstem-') as tmp:
        identity = identity_transform(str(Path(tmp) / 'identity.mat'))
        reg = ants.registration(fixed_r, moving_r, type_of_transform='SyN',
                                initial_transform=identity, reg_iterations=tuple(iterations),
                                outprefix=str(Path(tmp) / 'syn_'))
        dseg = ants.apply_transforms(ref, nib_to_ants(labels), reg['fwdtransforms'],
                                     interpolator='genericLabel')
        warped = ants.apply_transforms(ref, moving, reg['fwdtransforms'], interpolator='linear')
    t1 = ants.resample_image_to_target(fixed, ref, 'linear')
    before = ants.resample_image_to_target(moving, ref, 'linear').numpy()
    mask = t1.numpy() > 0
    corr = masked_correlation(warped.numpy(), t1.numpy(), mask)
    corr0 = masked_correlation(before, t1.numpy(), mask)
    LOGGER.info('SyN %s -> MNI152NLin2009cAsym: correlation in the brainstem box %.3f '
                '(%.3f before)', spec['moving_space'], corr, corr0)
    info = {'type': 'SyN', 'moving': spec['moving'], 'moving_space': spec['moving_space'],
            'fixed': fixed_rel, 'fixed_space': 'MNI152NLin2009cAsym', 'seed': seed,
            'correlation': round(corr, 4), 'correlation_before': round(corr0, 4)}
    t1_img = ants_to_nib(t1.new_image_like(t1.numpy().astype(np.float32)))
    return to_label_image(np.rint(dseg.numpy()), grid.affine), t1_img, info


def build_brainstem(sources: str | Path, out: str | Path, seed: int = 0,
                    navigator: str | Path | None = None, grid: BoxGrid = BRAINSTEM_GRID) -> dict:
    """Write the brainstem assets into ``out/brainstem`` and return their manifest section."""
    sources, out = Path(sources), Path(out)
    protocol = package_json(PROTOCOL)
    labels6, lut = build_label_set(sources, protocol, navigator)
    if not np.isclose(grid.origin[0] + (grid.shape[0] - 1) * grid.spacing, -grid.origin[0]):
        raise ValueError('The brainstem grid is not symmetric about x = 0.')
    dseg, t1, info = carry_to_frame(labels6, sources, protocol, grid, seed)
    files = {key: f'{BRAINSTEM_DIR}/{name}' for key, name in
             (('dseg', BRAINSTEM_DSEG), ('t1w', BRAINSTEM_T1W), ('lut', BRAINSTEM_LUT))}
    atomic_save(dseg, out / files['dseg'])
    atomic_save(t1, out / files['t1w'])
    atomic_write_text(out / files['lut'], lut_tsv(lut))
    log_volumes(dseg, lut, 'MNI152NLin2009cAsym')
    vol6, vol9 = label_volumes(labels6, lut), label_volumes(dseg, lut)
    restricted = bool(navigator)
    if restricted:
        LOGGER.warning(RESTRICTED_WARNING.format(dir=navigator))
    return {
        'protocol': protocol['name'], 'description': protocol['description'],
        'licence': protocol['licence'], 'citation': protocol['citation'],
        'space': 'MNI152NLin2009cAsym', 'grid': grid.to_dict(), **files,
        'n_labels': len(lut),
        'parts': {p: [r['index'] for r in lut if r['part'] == p] for p in PARTS},
        'registration': info,
        'volumes_mm3': {r['name']: {'MNI152NLin6Asym': vol6[r['name']],
                                    'MNI152NLin2009cAsym': vol9[r['name']]} for r in lut[1:]},
        'sources': sorted({s['file'] for s in protocol['sources'].values()}
                          | {protocol['registration']['moving']}),
        'restricted': restricted,
        'restricted_reason': (protocol['navigator']['licence'] if restricted else None),
        'navigator': str(Path(navigator).absolute()) if restricted else None,
    }
