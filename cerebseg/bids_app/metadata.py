"""What a participant run uses and what its sidecars say about it.

The networks of the cerebellum (:func:`select_cnn`) and the brainstem assets
(:func:`brainstem_paths`, with the checked network of ``--brainstem-method network``), and the
``Description``/``Method`` text of the native-space label maps' JSON sidecars
(:func:`dseg_meta`, :func:`brainstem_meta`).
"""
from __future__ import annotations

from pathlib import Path

from cerebseg.assets import protocol_setting, registration_control_mm
from cerebseg.bids_app.logs import LOGGER

#: the sidecar's ``Method.Registration`` for each ``--registration`` (``control_mm``: the
#: torch registration's control grid, :func:`cerebseg.assets.registration_control_mm`)
REGISTRATION_TEXT = {
    'ants': 'ANTs affine (2 mm) + SyN (Mattes mutual information, 40x20x0 iterations at 4/2/1 '
            'mm) of every library entry to the subject, masked to the entry field of view; '
            'labels carried with genericLabel interpolation.',
    'torch': 'cerebseg torch registration of all library entries in one batch: affine, then a '
             'diffeomorphic stationary velocity field (scaling and squaring; control grid '
             '{control_mm:g} mm) at 4, 2 and 1 mm, '
             'squared local normalised cross-correlation measured in each entry\'s own space '
             'over the voxels where it has data (the subject read into the entry), plus '
             'diffusion regularisation, Adam; the entry brought onto the subject by the '
             'inverse transform, labels by nearest neighbour.',
}
REGISTRATION_TEXT['both'] = ('Every library entry registered twice, and all warped entries '
                             'fused. (1) ' + REGISTRATION_TEXT['torch'] + ' (2) '
                             + REGISTRATION_TEXT['ants'])


FUSION_NAMES = {'local': 'locally', 'nonlocal': 'non-local', 'mixed': 'mixed local and non-local'}


def _fusion_kind(fusion: dict) -> str:
    """``local``, ``nonlocal`` or ``mixed``, from :func:`fusion_settings`' result."""
    if not fusion['search']:
        return 'local'
    return 'nonlocal' if fusion['nonlocal_weight'] >= 1.0 else 'mixed'


def fusion_text(fusion: dict) -> str:
    """The fusion of :func:`fusion_settings`, in words, for the dseg sidecar."""
    search, nonlocal_weight = fusion['search'], fusion['nonlocal_weight']
    weight = ('weight = 1/(mean squared intensity difference over a 5x5x5 patch + 1e-3), '
              'averaged over T1w and T2w where the entry has both')
    levels = (' Before the vote each entry\'s T1w is mapped piecewise linearly so that its median '
              'over its own grey-matter and white-matter labels equals the subject\'s median over '
              'the same voxels.' if fusion['white_labels'] else '')
    kind = _fusion_kind(fusion)
    if kind == 'local':
        return f'locally weighted voting: {weight}.' + levels
    shifted = (f'each entry votes the label of its 5x5x5 patch that best matches the '
               f'subject\'s among those shifted by up to {search} voxel'
               f'{"s" if search > 1 else ""} (0.5 mm each) in every direction; {weight}')
    if kind == 'nonlocal':
        return f'non-local weighted voting: {shifted}.' + levels
    return (f'locally and non-locally weighted voting mixed: the probabilities are '
            f'{1 - nonlocal_weight:g} times those of local voting plus {nonlocal_weight:g} times '
            f'those of non-local voting ({shifted}).' + levels)


def fusion_settings(cfg, library: dict) -> dict:
    """The label fusion of a run: ``search`` (``--fusion-search``; ``auto``: the protocol's
    ``fusion.search``, 0 without one), ``nonlocal_weight`` (``--fusion-nonlocal-weight``;
    ``auto``: the protocol's with ``--fusion-search auto``, else 1, non-local only) and
    ``white_labels`` (the protocol's corpus medullare, ``branch_units`` 0, when its
    ``fusion.match_levels``: the entries' T1w levels are matched to the subject's; else
    empty). A non-local share of 0 is local voting (search 0, share 1)."""
    proto = protocol_setting(library, 'fusion', None) or {}
    auto = str(cfg.fusion_search) == 'auto'
    search = int(proto.get('search', 0)) if auto else int(cfg.fusion_search)
    if str(cfg.fusion_nonlocal_weight) != 'auto':
        weight = float(cfg.fusion_nonlocal_weight)
    else:
        weight = float(proto.get('nonlocal_weight', 1.0)) if auto else 1.0
    white = []
    if proto.get('match_levels'):
        units = protocol_setting(library, 'branch_units', None) or []
        white = [value for value, unit in enumerate(units, 1) if unit == 0]
    if weight <= 0.0:
        search = 0
    return {'search': search, 'nonlocal_weight': weight if search else 1.0,
            'white_labels': white}


def select_cnn(run, cfg) -> dict | None:
    """The network weights of one run (None with --models none); CheckpointError if missing."""
    from cerebseg.models.checkpoint import select_weights

    if cfg.models == 'none' or cfg.skip_cerebellum:
        return None
    return select_weights(cfg.cnn_weights or None, t2w=bool(run.t2w),
                          prior=not cfg.no_atlas_prior, models=cfg.models,
                          protocol=cfg.atlas_library)


ROLE_TEXT = {'labels': 'the lobule networks decide every label',
             'outline': 'the lobule networks decide where the cerebellum ends (their background '
                        'probability); which lobule each cerebellar voxel belongs to is the '
                        'atlas prior\'s (its share of the foreground)'}


def cnn_meta(cnn: dict) -> dict:
    """What the sidecar says about the networks (from their self-describing checkpoints)."""
    from cerebseg.models.checkpoint import read_cascade_checkpoint
    from cerebseg.utils.images import sha256sum

    stages = {}
    for stage in ('hemisphere', 'lobules'):
        nets = []
        for path, arch in zip(cnn[stage]['files'], cnn[stage]['architectures']):
            meta = read_cascade_checkpoint(path)
            train = meta.get('training', {})
            nets.append({'File': Path(path).name, 'Architecture': arch,
                         'Sha256': sha256sum(path),
                         'TrainingSteps': train.get('step'),
                         'TrainingData': train.get('bids_dir'),
                         'ValidationDice': train.get('best_validation_dice')})
        stages[stage.capitalize()] = {'Inputs': cnn[stage]['inputs'], 'Networks': nets}
    role = cnn.get('role', 'labels')
    return {'Name': 'DeepCeres cascade: hemisphere network (background/left/right cerebellum), '
                    'then the lobule network(s) at 0.5 mm inside its mask; several lobule '
                    'networks are averaged (ensemble) and their disagreement is the '
                    'uncertainty map', 'Inputs': cnn['variant'],
            'Role': role, 'RoleDescription': ROLE_TEXT[role], **stages}


def protocol_summary(name: str) -> str:
    """What a label protocol labels, in words (its ``summary``; the name for a protocol
    unknown to this version)."""
    return protocol_setting({'name': name}, 'summary', f'label protocol {name}')


def outline_mode(cfg, library: dict) -> str:
    """How the native cerebellum's outline is decided (``--outline``): ``fused``, ``trimmed``
    (by the T1w) or ``tissue`` (trimmed and grown by the T1w); ``auto``: what the library's
    label protocol says, its ``outline`` key (``tissue`` for a protocol that labels tissue
    only, ``fused`` for one whose atlas labels its template's partial-volume shell)."""
    if cfg.outline != 'auto':
        return cfg.outline
    return 'tissue' if protocol_setting(library, 'outline', 'atlas') == 'tissue' else 'fused'


def lobule_branches(cfg, library: dict) -> dict | None:
    """The ``units`` and ``sides`` of each label value when the lobule borders move onto the
    white-matter branches (``--lobule-borders``; ``auto``: the protocol's ``lobule_borders``
    key), else None. A protocol without ``branch_units`` cannot: ``branches`` is refused.
    ``votes``: the library's lobule votes (:meth:`cerebseg.assets.locate.Assets.library_paths`)
    where it has them."""
    choice = cfg.lobule_borders
    if choice == 'auto':
        choice = protocol_setting(library, 'lobule_borders', 'fused')
    if choice != 'branches':
        return None
    units = protocol_setting(library, 'branch_units', None)
    sides = protocol_setting(library, 'branch_sides', None)
    if not units or not sides:
        raise ValueError(f'--lobule-borders branches needs a label protocol with a labelled '
                         f'corpus medullare (cobra); the {library["name"]!r} library has none. '
                         f'Use --atlas-library cobra or --lobule-borders fused.')
    out = {'units': [0, *units], 'sides': [0, *sides]}
    votes = cfg.lobule_votes
    if votes == 'on' and not library.get('votes'):
        raise ValueError(f'--lobule-votes on: the {library["name"]!r} library has no lobule '
                         f'votes (assets built by an older cerebseg, or a protocol without '
                         f'them). Rebuild the assets (cerebseg-assets build --library '
                         f'{library["name"]}) or use --lobule-votes off.')
    if library.get('votes') and votes != 'off':
        out['votes'] = library['votes']
    return out


#: ``Method.LobuleBorders`` with the branches (its exponent is cerebseg.utils.branches.SHARPNESS,
#: not imported here: the command's start-up imports no NumPy)
BRANCHES_TEXT = ('each white-matter branch of the bias-corrected T1w in the working box (the '
                 'labelled lobules brighter than a level between their grey matter and the '
                 'corpus medullare, the corpus medullare and 1 mm around it left out; split at '
                 'rising levels) weighs the lobules, sides merged, by the share of its fused '
                 'probability each carries, and every labelled voxel within 2 mm takes the '
                 'lobule that maximises its own fused probability times the nearest '
                 'branch\'s share to the power 1.5 (side kept); outline and corpus medullare '
                 'unchanged.')
#: ``Method.LobuleBorders`` when the borders are left as the fusion draws them
FUSED_BORDERS_TEXT = 'as fused (not moved onto the white-matter branches).'
#: added to BRANCHES_TEXT when the library has lobule votes (its weight is the library's)
VOTES_TEXT = (' Which lobule a branch carries is also voted by an independent population atlas '
              '({protocol} protocol, its lobules mapped onto the CERES lobules, sides merged; '
              'entries {names}), registered and fused the same way: its lobule probabilities '
              'count {weight:g} against {rest:g} for the fused ones, in the shares and in each '
              'voxel\'s own probability.')


def borders_text(branches: dict | None) -> str:
    """``Method.LobuleBorders``: what :func:`lobule_branches` gives, in words."""
    if not branches:
        return FUSED_BORDERS_TEXT
    votes = branches.get('votes')
    if not votes:
        return BRANCHES_TEXT
    return BRANCHES_TEXT + VOTES_TEXT.format(protocol=votes['protocol'].upper(),
                                             names=', '.join(votes['names']),
                                             weight=votes['weight'], rest=1 - votes['weight'])

OUTLINE_TEXT = ('outline voxels (a face on the background) whose bias-corrected T1w intensity is '
                'below the midpoint between the CSF level (the darker of two intensity classes '
                'within 3 voxels outside the labels) and the median of the labelled tissue are '
                'background (more CSF than tissue); the new outline is judged again, up to '
                '3 mm deep (three layers of 1 mm voxels: a dark voxel goes when a chain of dark '
                'voxels joins it to the background).')
#: ``Method.Outline`` of ``--outline tissue`` (cerebseg.utils.outline.SUPPORT and
#: TRIM_DEPTH_MM, not imported here: the command's start-up imports no NumPy)
TISSUE_OUTLINE_TEXT = (OUTLINE_TEXT + ' Then the voxels just outside the labels at or above '
                       'that midpoint, with a face neighbour outside the labels below it '
                       '(between the labels and CSF, not other tissue), where the fused '
                       'probability of the cerebellum is at least 0.25, take the nearest label '
                       '(more tissue than CSF; one layer).')
#: ``Method.Outline`` when the outline is left as the fusion draws it
FUSED_OUTLINE_TEXT = 'as fused (not trimmed or grown by the image).'


def dseg_meta(run, library: dict, bids_dir: Path, cfg, cnn: dict | None = None) -> dict:
    """The sidecar of the cerebellum label map of one run."""
    from cerebseg import __version__

    def bids_uri(path):
        return f'bids:raw:{Path(path).relative_to(bids_dir).as_posix()}'

    sources = [bids_uri(run.t1w)] + ([bids_uri(run.t2w)] if run.t2w else [])
    branches = lobule_branches(cfg, library)
    fusion = fusion_settings(cfg, library)
    meta = {
        'Description': f'Cerebellar labels following {protocol_summary(library["name"])} by '
                       + ('the DeepCeres CNN cascade with a multi-atlas prior.' if cnn else
                          'multi-atlas segmentation.'),
        'Sources': sources,
        'Mode': 'T1w+T2w' if run.t2w else 'T1w',
        'Method': {
            'Name': 'multi-atlas registration and ' + FUSION_NAMES[_fusion_kind(fusion)]
                    + ' weighted majority voting',
            'Preprocessing': 'N4 bias correction and non-local means denoising (ANTs) in native '
                             'space; affine registration to MNI152NLin2009cAsym, '
                             + affine_text(cfg) + '; T2w rigidly to '
                             'T1w; 0.5 mm box around cerebellum and brainstem; N4 in the box; '
                             'intensities scaled so that the 2nd/98th foreground percentiles '
                             'are 0/1.',
            'Registration': REGISTRATION_TEXT[cfg.registration].format(
                control_mm=registration_control_mm(library)),
            'Fusion': fusion_text(fusion),
            'NativeSpace': 'per-label probabilities resampled linearly through the inverse '
                           'affine, then the most probable label.',
            'Outline': {'trimmed': OUTLINE_TEXT, 'tissue': TISSUE_OUTLINE_TEXT,
                        'fused': FUSED_OUTLINE_TEXT}[outline_mode(cfg, library)],
            'LobuleBorders': borders_text(branches),
        },
        'LabelProtocol': protocol_summary(library['name']),
        'AtlasLibrary': {'Name': library['name'], 'Citation': library['citation'],
                         'Licence': library['licence'],
                         'Entries': [e['name'] for e in library['entry_info']],
                         **({'LobuleVotes': branches['votes']['names']}
                            if branches and branches.get('votes') else {})},
        'LookupTable': 'seg-cerebellum_dseg.tsv',
        'IntracranialVolumeMethod': 'eTIV-style: volume of the MNI152NLin2009cAsym brain mask '
                                    'times the determinant of the native-to-MNI affine '
                                    '(Buckner et al. 2004).',
        'SoftwareVersion': f'cerebseg {__version__}',
        'RandomSeed': cfg.random_seed,
    }
    if cnn:
        meta['Method']['Networks'] = cnn_meta(cnn)
        meta['Method']['NativeSpace'] = meta['Method']['NativeSpace'].replace(
            'per-label probabilities', 'per-label ensemble probabilities')
    return meta


def brainstem_paths(assets, cfg) -> dict | None:
    """The brainstem assets with absolute paths; None with --skip-brainstem, or (with a
    warning) when the assets were built without them."""
    from cerebseg.errors import MissingAssetError

    if cfg.skip_brainstem:
        return None
    try:
        section = assets.brainstem()
    except MissingAssetError as err:
        LOGGER.warning('Brainstem skipped: %s Or pass --skip-brainstem to silence this.', err)
        return None
    if section.get('restricted'):
        LOGGER.warning('The brainstem label set includes the Brainstem Navigator (%s): its '
                       'licence forbids sharing the assets or anything derived from them; keep '
                       'this run\'s brainstem outputs within your organisation.',
                       section.get('navigator'))
    files = {key: assets.path(section[key]) for key in ('t1w', 'dseg', 'lut')}
    for key, path in files.items():
        if not path.is_file():
            raise MissingAssetError(
                f'{path} is missing: the manifest of the assets in {assets.root} lists a '
                f'brainstem label set but its {key} file is not there. Build the assets again '
                '(cerebseg-assets build), or pass --skip-brainstem.')
    out = {**{key: str(path) for key, path in files.items()}, 'n_labels': section['n_labels'],
           'grid': section['grid'], 'description': section['description'],
           'citation': section['citation'], 'licence': section['licence'],
           'restricted': bool(section.get('restricted')), 'method': cfg.brainstem_method}
    if cfg.brainstem_method == 'network':
        out['weights'], out['network'] = brainstem_network(cfg, out['lut'])
    return out


def brainstem_network(cfg, lut: str) -> tuple[str, dict]:
    """The checkpoint of --brainstem-method network and a summary of it, checked against the
    label set before any work starts (CheckpointError: exit 126)."""
    from cerebseg.models.checkpoint import DEFAULT_BRAINSTEM, CheckpointError, read_brainstem_meta
    from cerebseg.utils.native import read_lut_tsv

    path = Path(cfg.brainstem_weights) if cfg.brainstem_weights else DEFAULT_BRAINSTEM
    if not path.is_file():
        raise CheckpointError(f'brainstem network weights not found: {path}; pass '
                              '--brainstem-weights FILE (cerebseg-train brainstem) or use '
                              '--brainstem-method atlas')
    meta = read_brainstem_meta(path)   # no network built here: see read_brainstem_meta
    names = [r['name'] for r in read_lut_tsv(lut)]
    if list(meta['labels']) != names:
        raise CheckpointError(f'{path} was trained on other brainstem labels than the '
                              f'{len(names)} of the assets ({lut}); train weights on this label '
                              'set (cerebseg-train brainstem) or use --brainstem-method atlas')
    cfg_ = meta['config']
    extra = meta.get('meta') or {}
    return str(path), {'Decoder': cfg_['decoder'], 'Encoder': cfg_['encoder'],
                       'EncoderWidth': cfg_.get('encoder_width', 64),
                       'Inputs': meta['channels'], 'Slicing': extra.get('slicing'),
                       'Weights': path.name, 'LabelSource': extra.get('label_source')}


def affine_text(cfg) -> str:
    """How the MNI affine was fitted (``--affine-fit``), for the sidecars' Preprocessing."""
    if cfg.affine_fit == 'single':
        return 'whole brain, then refined on cerebellum and brainstem, one fit each'
    if cfg.affine_fit == 'coarse':
        return ('whole brain from one start on 4 mm copies (coarse: for tests, not for '
                'volumes), then refined on cerebellum and brainstem, one fit each')
    return ('whole brain, then refined on cerebellum and brainstem, each fitted to the T1w '
            'and to its left-right mirror and the two fits averaged (mirror-equivariant)')


def brainstem_meta(run, brainstem: dict, bids_dir: Path, cfg) -> dict:
    """The sidecar of the brainstem label map of one run."""
    from cerebseg import __version__

    sources = [f'bids:raw:{Path(run.t1w).relative_to(bids_dir).as_posix()}']
    method = {
        'Name': 'single-atlas registration (the brainstem label set of the assets)',
        'Preprocessing': 'the cerebellum\'s MNI152NLin2009cAsym affine ('
                         + affine_text(cfg) + '); 1 mm box around the brainstem; N4 in '
                         'the box; 2nd/98th foreground percentiles scaled to 0/1.',
        'Registration': 'the label-set template (MNI152NLin2009cAsym brain on the box) onto '
                        'the subject: affine, then a diffeomorphic stationary velocity field '
                        'at 4, 2 and 1 mm (local normalised cross-correlation on the '
                        'subject\'s grid); labels warped as probabilities.',
        'NativeSpace': 'per-label probabilities resampled linearly through the inverse '
                       'affine; the outline first (brainstem where its labels together '
                       'outweigh the background), then its most probable label.',
    }
    if brainstem.get('method') == 'network':
        method['Name'] = '2D network on axial slices of the brainstem box'
        method['Network'] = brainstem['network']
        method.pop('Registration')
    return {
        'Description': 'Brainstem parts (midbrain, pons, medulla; grey and white matter) and '
                       'nuclei from an atlas label set built from open atlases, by '
                       + ('a 2D network trained on its registrations.'
                          if brainstem.get('method') == 'network' else 'registration.'),
        'Sources': sources,
        'Mode': 'T1w',
        'Method': method,
        'LabelSet': {'Description': brainstem['description'], 'Citation': brainstem['citation'],
                     'Licence': brainstem['licence'], 'Restricted': brainstem['restricted']},
        'LookupTable': 'seg-brainstem_dseg.tsv',
        'SoftwareVersion': f'cerebseg {__version__}',
        'RandomSeed': cfg.random_seed,
    }
