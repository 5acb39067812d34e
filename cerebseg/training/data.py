"""Training data of the segmentation networks: a BIDS dataset plus a folder of labels.

For each T1w (and paired T2w), cerebseg's own preprocessing and multi-atlas prior are run
(:func:`cerebseg.workflows.base.init_prior_wf`, cached in the work folder and shared with
``cerebseg`` runs that used the same one); the reference labels are read from the derivatives
folder, either on the working grid (``space-MNI152NLin2009cAsym_res-05``, as cerebseg writes
them) or on the T1w's own grid (``space-T1w`` or no ``space``; resampled into the working grid
with the T1w-to-MNI affine, nearest label). The result is cropped around the cerebellum and
cached as ``.npz``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cerebseg.errors import BadDataError

LOGGER = logging.getLogger('cerebseg.train')
GRID_SPACE = 'space-MNI152NLin2009cAsym_res-05'
CACHE_VERSION = 3   # 2: the library's entries in the key; 3: the registration control grid
#: crop margin around the cerebellum (voxels of 0.5 mm): the cascade's 12 mm region margin
CROP_MARGIN = 24


def find_label_file(deriv_dir, run) -> Path:
    """The reference ``dseg`` of one T1w in a derivatives folder (working grid preferred)."""
    deriv_dir = Path(deriv_dir)
    folder = deriv_dir / f'sub-{run.subject}'
    if run.session:
        folder = folder / f'ses-{run.session}'
    folder = folder / 'anat'
    found = sorted(folder.glob(f'{run.label}_*dseg.nii*')) if folder.is_dir() else []
    found = [p for p in found if '_desc-' not in p.name]  # desc-prior etc. are not references
    from cerebseg.interfaces.bids import space_matches

    for rank in (lambda n: space_matches(n, GRID_SPACE[len('space-'):]),
                 lambda n: '_space-T1w_' in n,
                 lambda n: '_space-' not in n):
        hits = [p for p in found if rank(p.name)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise BadDataError(f'Several label files for {run.label} in {folder}: '
                               f'{[p.name for p in hits]}; keep one per T1w.')
    raise BadDataError(
        f'No label file for {run.label} in {folder}. Expected '
        f'{run.label}_space-MNI152NLin2009cAsym_seg-cerebellum_res-05_dseg.nii.gz (working grid, '
        'as cerebseg writes) '
        f'or {run.label}[_space-T1w]_dseg.nii.gz on the T1w grid.')


def labels_on_grid(label_path, t1w_path, grid, t1_to_mni: str) -> np.ndarray:
    """Label values (int16) on the working ``grid`` (a :class:`~cerebseg.utils.grid.BoxGrid`)."""
    import ants
    import nibabel as nib

    from cerebseg.utils.images import load_checked, nib_to_ants

    img = load_checked(label_path, 'label map')
    data = np.asarray(img.dataobj)
    if np.any(np.abs(data - np.rint(data)) > 1e-3) or data.min() < 0:
        raise BadDataError(f'{label_path} is not a label map (non-integer or negative values)')
    if img.shape[:3] == tuple(grid.shape) and np.allclose(img.affine, grid.affine, atol=1e-3):
        return np.rint(data).astype(np.int16)
    t1 = nib.load(t1w_path)
    if img.shape[:3] != t1.shape[:3] or not np.allclose(img.affine, t1.affine, atol=1e-3):
        raise BadDataError(f'{label_path} is neither on the working grid ({GRID_SPACE}) nor on '
                           f'the grid of its T1w {t1w_path}; resample it onto one of them.')
    moving = nib_to_ants(nib.Nifti1Image(np.rint(data).astype(np.float32), img.affine))
    out = ants.apply_transforms(grid.reference(), moving, [t1_to_mni],
                                interpolator='genericLabel')
    return np.rint(out.numpy()).astype(np.int16)


#: the prior of a run with local voting and the borders as fused (``prepare_subject``'s ``prior``)
LOCAL_PRIOR = {'search': 0, 'nonlocal_weight': 1.0, 'white_labels': [], 'branches': None}


def prior_settings(prior: dict | None) -> dict:
    """``prior`` (a subset of :data:`LOCAL_PRIOR`'s keys: the fusion of
    :func:`cerebseg.bids_app.metadata.fusion_settings` and the ``branches`` of
    :func:`~cerebseg.bids_app.metadata.lobule_branches`) completed with the local defaults."""
    return {**LOCAL_PRIOR, **(prior or {})}


def prior_tag(prior: dict | None) -> str:
    """The training cache's name for a prior's settings ('' for :data:`LOCAL_PRIOR`), e.g.
    ``_search1w0.5_levels_branches-votes`` for cobra's default."""
    p = prior_settings(prior)
    tag = ''
    if p['search']:
        tag += f'_search{p["search"]}'
        if p['nonlocal_weight'] != 1.0:
            tag += f'w{p["nonlocal_weight"]:g}'
    if p['white_labels']:
        tag += '_levels'
    if p['branches']:
        tag += '_branches' + ('-votes' if p['branches'].get('votes') else '')
    return tag


def _prior_outputs(run, assets, library: dict, work_dir: Path, omp_nthreads: int, seed: int,
                   prior: dict | None = None):
    """Run (or reuse) the preprocessing and prior of one T1w; its output file paths."""
    from cerebseg.assets import registration_control_mm
    from cerebseg.workflows.base import fusion_kwargs, init_prior_wf
    from cerebseg.workflows.workdir import participant_work_dir, workflow_name

    p = prior_settings(prior)
    wf = init_prior_wf(t1w=run.t1w, t2w=run.t2w, templates=assets.template_paths(),
                       grid=assets.manifest['grid'], library=library,
                       omp_nthreads=omp_nthreads, seed=seed, **fusion_kwargs(p),
                       branches=p['branches'],
                       reg_control_mm=registration_control_mm(library),
                       name=workflow_name(run.label))
    wf.base_dir = str(participant_work_dir(work_dir))   # where `cerebseg` puts this run
    wf.config['execution'].update({'crashdump_dir': str(work_dir / 'crash'),
                                   'crashfile_format': 'txt', 'stop_on_first_crash': True,
                                   'remove_unnecessary_outputs': False})
    graph = wf.run(plugin='Linear')
    node = next(n for n in graph.nodes() if n.fullname.endswith(f'{wf.name}.outputnode'))
    return node.result.outputs


def prepare_subject(run, label_file, assets, library: dict, work_dir, *, omp_nthreads: int = 1,
                    seed: int = 0, prior: dict | None = None, prepared: bool = False):
    """A :class:`~cerebseg.training.cascade.Subject` of one T1w, cached in ``work_dir``
    (``prior``: how the prior is made, :func:`prior_settings`; the run's own settings give the
    networks the prior they will see; one cache file per setting, :func:`prior_tag`).

    ``prepared``: take the cached data whatever library made its prior (e.g. each case's own
    leave-one-out library, prepared one by one), and raise :class:`BadDataError` where there is
    none instead of computing it."""
    import nibabel as nib

    from cerebseg.assets import registration_control_mm
    from cerebseg.training.cascade import Subject, crop_subject
    from cerebseg.utils.grid import BoxGrid
    from cerebseg.utils.images import read_probseg
    from cerebseg.utils.labels import class_index, read_lut

    work_dir = Path(work_dir)
    name = f'{run.label}_{library["name"]}{prior_tag(prior)}.npz'
    cache = work_dir / 'segmentation_data' / name
    control = registration_control_mm(library)
    inputs = f'{CACHE_VERSION}|{control:g}|{Path(label_file).resolve()}|' \
             f'{Path(label_file).stat().st_mtime_ns}|{run.t1w}|{run.t2w}|'
    key = inputs + ','.join(e['name'] for e in library['entry_info'])
    if cache.is_file():
        with np.load(cache) as data:
            found = str(data['key'])
            if found == key or (prepared and found.startswith(inputs)):
                if found != key:
                    LOGGER.info('%s: prior from the library entries %s', run.label,
                                found[len(inputs):])
                return Subject(run.label, data['t1'], data['x_mm'],
                               data['t2'] if data['t2'].size else None, data['prior'],
                               classes=data['classes'])
    if prepared:
        raise BadDataError(f'No prepared training data for {run.label} (labels {label_file}) '
                           f'in {cache.parent}; prepare it first (--prepare-only) or leave '
                           'out --prepared.')
    LOGGER.info('Preparing %s (preprocessing and prior; labels from %s)', run.label, label_file)
    out = _prior_outputs(run, assets, library, work_dir, omp_nthreads, seed, prior)
    grid = BoxGrid.from_dict(assets.manifest['grid'])
    t1 = np.asarray(nib.load(out.t1_box).dataobj, np.float32)
    t2 = np.asarray(nib.load(out.t2_box).dataobj, np.float32) if out.t2_box else None
    prior = read_probseg(out.probseg_box)
    values = labels_on_grid(label_file, run.t1w, grid, out.t1_to_mni)
    try:
        classes = class_index(values, read_lut(library['lut']))
    except ValueError as err:
        raise BadDataError(f'{label_file}: {err} of the {library["name"]} protocol '
                           f'({library["lut"]}); use --atlas-library to choose the '
                           'protocol of your labels') from err
    x_mm = grid.affine[0, 3] + grid.spacing * np.arange(grid.shape[0])
    subject = crop_subject(Subject(run.label, t1, x_mm, t2, prior, classes=classes),
                           CROP_MARGIN)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + '.tmp.npz')
    np.savez(tmp, key=key, t1=subject.t1, classes=subject.classes, x_mm=subject.x_mm,
             t2=subject.t2 if subject.t2 is not None else np.zeros(0, np.float32),
             prior=subject.prior)
    tmp.replace(cache)
    return subject
