"""Checkpoints of every cerebseg network: save, load, validate; the shipped weights.

Three families of networks, one file format each, all self-describing and loaded with
``torch.load(..., weights_only=True)`` and strict keys:

* the DeepCeres cascade (:mod:`cerebseg.models.nets3d`): :func:`save_cascade_net`,
  :func:`read_cascade_checkpoint`, :func:`load_cascade_net` (format ``cerebseg-segmentation``);
* the 2D brainstem networks (:mod:`cerebseg.models.nets2d`): :func:`save_brainstem_net`,
  :func:`read_brainstem_meta`, :func:`load_brainstem_net` (format ``cerebseg-brainstem2d``);
* the registration network (:mod:`cerebseg.models.regnet`): :func:`save_regnet`,
  :func:`load_regnet`.

The weights that ship with cerebseg lie in :data:`WEIGHTS_DIR`; :data:`WEIGHTS_MANIFEST`
(``manifest.json``) lists the sha256 of every file there, and every shipped file is checked
against it before it is read (:func:`verify_shipped`). The default weights of each family:
:data:`DEFAULT_CASCADE` and :data:`CASCADE_MANIFESTS` (per label protocol, ``deepceres.json``
for SUIT and ``deepceres_cobra.json`` for CERES: per input set, the hemisphere and lobule
checkpoints, chosen by :func:`select_weights`), :data:`DEFAULT_BRAINSTEM`,
:data:`DEFAULT_REGNET` (not shipped: used when a user puts one there).

Every failure is a :class:`CheckpointError` (exit 126) naming the file and the fix: missing,
unreadable, corrupt (sha256), foreign format, newer version, weights that do not fit the
declared architecture, or a checkpoint that does not fit the run (inputs, stage, protocol,
label set).
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from cerebseg import __version__
from cerebseg.errors import MissingAssetError
from cerebseg.models import nets2d, nets3d, regnet
from cerebseg.utils.images import sha256sum

LOGGER = logging.getLogger('cerebseg.models.checkpoint')

#: the shipped weights and their manifest (file name -> sha256, bytes, family)
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / 'data' / 'weights'
WEIGHTS_MANIFEST = WEIGHTS_DIR / 'manifest.json'
#: default weights of each family (see the model cards beside them)
DEFAULT_CASCADE = WEIGHTS_DIR / 'deepceres.json'
#: the default cascade manifest of each label protocol (``--atlas-library``), beside
#: :data:`DEFAULT_CASCADE` (the SUIT protocol's)
CASCADE_MANIFESTS = {'suit': 'deepceres.json', 'cobra': 'deepceres_cobra.json'}
DEFAULT_BRAINSTEM = WEIGHTS_DIR / 'brainstem_ndeconet_T1w.pt'
DEFAULT_REGNET = WEIGHTS_DIR / 'regnet.pt'
#: the lobule networks a run may use (--models)
MODEL_CHOICES = ('ensemble', 'unet', 'dpn')
#: what the lobule networks decide (a weights manifest's ``role``): every label, or the outline
#: only (the lobules from the prior; :func:`cerebseg.models.cascade.outline_role`)
ROLES = ('labels', 'outline')

CASCADE_FORMAT = 'cerebseg-segmentation'
CASCADE_VERSION = 1
BRAINSTEM_FORMAT = 'cerebseg-brainstem2d'
BRAINSTEM_VERSION = 1
REGNET_FORMAT = 'cerebseg-regnet'
REGNET_VERSION = 1
REINSTALL = 'reinstall cerebseg (pip install --force-reinstall, or pull the container again)'


class CheckpointError(MissingAssetError):
    """A segmentation checkpoint is missing, foreign, corrupt or does not fit the run."""

def load_torch_file(path, what: str, hint: str = '', kind: str = 'torch checkpoint'):
    """``torch.load`` (CPU, ``weights_only``) of a weights file; a missing or unreadable file is
    a :class:`CheckpointError` naming it: ``"{what} not found: {path}{hint}"`` and
    ``"{path} is not a readable {kind} ({error}){hint}"``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{what} not found: {path}{hint}')
    verify_shipped(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise CheckpointError(f'{path} is not a readable {kind} ({err}){hint}') from err

def _envelope(fmt: str, version: int) -> dict:
    """The keys every cerebseg checkpoint starts with: what it is, and who wrote it."""
    return {'format': fmt, 'format_version': version, 'cerebseg_version': __version__}


def _weights(model: nn.Module, half: bool) -> dict:
    """The state dict on the CPU (floating-point tensors as float16 with ``half``)."""
    return {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in model.state_dict().items()}


def _write(path, ckpt: dict) -> Path:
    """``torch.save`` to a temporary name, then renamed: never half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def check_format(ckpt, path, fmt: str, version: int, kind: str) -> dict:
    """``ckpt`` if it is a dict of format ``fmt`` no newer than ``version``; else
    CheckpointError naming ``path`` (``kind``: what it should have been)."""
    if not isinstance(ckpt, dict) or ckpt.get('format') != fmt:
        raise CheckpointError(f'{path} is not {kind}')
    if ckpt.get('format_version', 0) > version:
        raise CheckpointError(f'{path} was written by a newer cerebseg '
                              f'({ckpt.get("cerebseg_version")}); upgrade cerebseg.')
    return ckpt

def save_cascade_net(path, model: nn.Module, *, architecture: str, inputs, stage: str,
                    labels: list, spacing: float, protocol: str, training: dict | None = None,
                    half: bool = False) -> Path:
    """Write a self-describing checkpoint atomically.

    ``labels`` are ``[index, name]`` pairs: output class ``i`` is protocol label
    ``labels[i][0]`` (class 0 is the background). ``half`` stores the weights as float16.
    """
    # plain JSON types only, so that the file loads with weights_only=True
    training = json.loads(json.dumps(training or {}, default=str))
    ckpt = {**_envelope(CASCADE_FORMAT, CASCADE_VERSION), 'architecture': architecture,
            'config': {k: v for k, v in model.config.items()},
            'inputs': nets3d.check_inputs(inputs), 'stage': stage,
            'labels': [[int(i), str(n)] for i, n in labels], 'spacing': float(spacing),
            'protocol': protocol, 'training': training, 'state_dict': _weights(model, half)}
    return _write(path, ckpt)

def read_cascade_checkpoint(path) -> dict:
    """The checkpoint dictionary (``weights_only``), checked to be a cerebseg segmentation one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'segmentation weights not found: {path}. Train them with '
                              '`cerebseg-train segmentation` or reinstall cerebseg.')
    ckpt = load_torch_file(path, 'segmentation weights', '; replace it or reinstall cerebseg.')
    return check_format(ckpt, path, CASCADE_FORMAT, CASCADE_VERSION,
                        'a cerebseg segmentation checkpoint')

def load_cascade_net(path, *, inputs=None, stage: str | None = None, protocol: str | None = None,
                    device='cpu') -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_cascade_net` (strict keys, float32, eval mode).

    ``inputs``, ``stage`` and ``protocol``, when given, must match what the checkpoint was
    trained with; otherwise :class:`CheckpointError` says what differs and how to fix it.
    Returns the model and the checkpoint's metadata (everything but the weights).
    """
    ckpt = read_cascade_checkpoint(path)
    meta = {k: v for k, v in ckpt.items() if k != 'state_dict'}
    if inputs is not None and nets3d.check_inputs(inputs) != meta['inputs']:
        raise CheckpointError(
            f'{path} was trained on the inputs {"+".join(meta["inputs"])}, but this run has '
            f'{"+".join(nets3d.check_inputs(inputs))}. Use weights trained on these inputs '
            '(`cerebseg-train segmentation --inputs ...`) or change the run options '
            '(--t1-only, --no-atlas-prior).')
    if stage is not None and meta['stage'] != stage:
        raise CheckpointError(f'{path} is a {meta["stage"]} network, not a {stage} network')
    # a hemisphere network's classes (background, left, right) and its prior channels (left and
    # right cerebellum) are the same for every protocol
    if protocol is not None and meta['protocol'] != protocol and meta['stage'] != 'hemisphere':
        raise CheckpointError(f'{path} segments the {meta["protocol"]} label protocol, not '
                              f'{protocol}; use --atlas-library {meta["protocol"]} or weights '
                              f'trained on {protocol} labels')
    model = nets3d.build_model(meta['architecture'], **meta['config'])
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt['state_dict'].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f'{path}: the weights do not fit the {meta["architecture"]} '
                              f'architecture it declares ({err})') from err
    return model.to(torch.device(device)).eval(), meta

# ---------------------------------------------------------------------------- checkpoints

def save_brainstem_net(path, model: nn.Module, meta: dict, half: bool = False) -> Path:
    """Write a self-describing checkpoint atomically (``half``: weights stored as float16, half
    the file; :func:`load_brainstem_net` puts them back into the float32 network).

    ``meta`` must hold ``channels`` (one name per input channel, e.g. ``['T1w', 'T2w']`` or
    ``['T1w-1', 'T1w', 'T1w+1']``) and ``labels`` (one name per output class, background first);
    anything else in it (training settings, scores) must be JSON-serialisable and is kept.
    """
    cfg = model.config
    channels = [str(c) for c in meta.get('channels', ())]
    labels = [str(n) for n in meta.get('labels', ())]
    if len(channels) != cfg['in_channels'] or len(set(channels)) != len(channels):
        raise ValueError(f'meta["channels"] must name the {cfg["in_channels"]} input channels '
                         f'once each, got {channels}')
    if len(labels) != cfg['n_classes']:
        raise ValueError(f'meta["labels"] must name the {cfg["n_classes"]} classes, got '
                         f'{len(labels)} names')
    extra = json.loads(json.dumps({k: v for k, v in meta.items()
                                   if k not in ('channels', 'labels')}, default=str))
    ckpt = {**_envelope(BRAINSTEM_FORMAT, BRAINSTEM_VERSION), 'config': dict(cfg),
            'channels': channels, 'labels': labels, 'meta': extra,
            'state_dict': _weights(model, half)}
    return _write(path, ckpt)


def read_brainstem_checkpoint(path) -> dict:
    ckpt = load_torch_file(path, 'brainstem network weights')
    return check_format(ckpt, path, BRAINSTEM_FORMAT, BRAINSTEM_VERSION,
                        'a cerebseg 2D brainstem checkpoint')


def read_brainstem_meta(path) -> dict:
    """The metadata of a :func:`save_brainstem_net` checkpoint (config, channels, labels,
    meta) without
    building the network. The command line checks weights this way before the workflow
    starts: a network built in the parent process leaves torch's thread pool there, and the
    Nipype workers forked from it then hung in their first convolution."""
    ckpt = read_brainstem_checkpoint(Path(path))
    return {k: v for k, v in ckpt.items() if k != 'state_dict'}


def load_brainstem_net(path, *, decoder: str | None = None, encoder: str | None = None,
               channels=None, device='cpu') -> tuple[nn.Module, dict]:
    """Load a checkpoint of :func:`save_brainstem_net` (strict keys, eval mode).

    ``decoder``, ``encoder`` and ``channels``, when given, must be those of the checkpoint;
    otherwise (and for a file that is not such a checkpoint) :class:`CheckpointError` names the
    file and what differs. Returns the model and the metadata (config, channels, labels, meta).
    """
    path = Path(path)
    ckpt = read_brainstem_checkpoint(path)
    cfg = dict(ckpt['config'])
    for what, want in (('decoder', decoder), ('encoder', encoder)):
        if want is not None and cfg[what] != want:
            raise CheckpointError(f'{path} is a {cfg["decoder"]}/{cfg["encoder"]} network, not '
                                  f'{what} {want}; use weights trained for this architecture')
    if channels is not None and list(channels) != ckpt['channels']:
        raise CheckpointError(f'{path} was trained on the input channels {ckpt["channels"]}, '
                              f'not {list(channels)}')
    model = nets2d.build_model(**cfg)
    try:
        model.load_state_dict(ckpt['state_dict'], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f'{path}: the weights do not fit the {cfg["decoder"]}/'
                              f'{cfg["encoder"]} architecture it declares ({err})') from err
    meta = {k: v for k, v in ckpt.items() if k != 'state_dict'}
    return model.to(torch.device(device)).eval(), meta

def save_regnet(net: nn.Module, path, meta: dict, opt_state: dict | None = None) -> None:
    """Atomic checkpoint: format, architecture, config, weights, plain metadata (and the
    optimiser state, to resume training)."""
    ckpt = {**_envelope(REGNET_FORMAT, REGNET_VERSION), 'architecture': 'RegNet',
            'config': net.config, 'input_mm': regnet.INPUT_MM, 'control_mm': regnet.CONTROL_MM,
            'state_dict': net.state_dict(), 'meta': meta}
    if opt_state is not None:
        ckpt['optimiser'] = opt_state
    _write(path, ckpt)

def load_regnet(path=None, device='cpu') -> nn.Module:
    """Load a checkpoint written by :func:`save_regnet` (strict keys, ``weights_only``)."""
    path = Path(path) if path else DEFAULT_REGNET
    ckpt = load_torch_file(path, 'registration network weights',
                           '; train them with `cerebseg-train registration` or use '
                           '--registration torch.')
    kind = f'a cerebseg RegNet checkpoint for a {regnet.CONTROL_MM} mm control grid'
    if isinstance(ckpt, dict) and 'format' not in ckpt:   # written before the format key
        ckpt = dict(ckpt, format=REGNET_FORMAT)
    ckpt = check_format(ckpt, path, REGNET_FORMAT, REGNET_VERSION, kind)
    if ckpt.get('architecture') != 'RegNet' or ckpt.get('control_mm') != regnet.CONTROL_MM:
        raise CheckpointError(f'{path} is not {kind}; train one with '
                              '`cerebseg-train registration`')
    net = regnet.RegNet(**ckpt['config'])
    try:
        net.load_state_dict(ckpt['state_dict'], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f'{path}: the weights do not fit the RegNet it declares '
                              f'({err})') from err
    return net.to(torch.device(device)).eval()


def select_weights(manifest=None, *, t2w: bool, prior: bool, models: str = 'ensemble',
                   protocol: str = 'suit') -> dict:
    """The checkpoints a run needs, from a weights manifest (JSON).

    The manifest maps an input set (``T1w+prior``, ``T1w+T2w+prior``, ...) to its
    ``hemisphere`` and ``lobules`` checkpoints (``file`` relative to the manifest,
    ``architecture``, ``inputs``) and, optionally, what the lobule networks decide (``role``,
    :data:`ROLES`: ``labels``, the default, or ``outline``; per variant or for the whole
    manifest). ``models`` keeps the lobule networks of one architecture or all of them (the
    ensemble). Raises :class:`CheckpointError` (exit 126) with the fix when something is
    missing.
    """
    default = DEFAULT_CASCADE.with_name(CASCADE_MANIFESTS.get(protocol, DEFAULT_CASCADE.name))
    if not manifest and protocol != 'suit' and not default.is_file():
        raise CheckpointError(f'no networks for the {protocol} label protocol ship with '
                              f'cerebseg ({default.name}); run with --models none, or pass '
                              '--cnn-weights with a manifest of weights trained by '
                              f'`cerebseg-train segmentation --atlas-library {protocol}`.')
    manifest = Path(manifest) if manifest else default
    if not manifest.is_file():
        raise CheckpointError(f'segmentation weights manifest not found: {manifest}. Reinstall '
                              'cerebseg, or pass --cnn-weights with a manifest of weights '
                              'trained by `cerebseg-train segmentation`.')
    verify_shipped(manifest)
    try:
        spec = json.loads(manifest.read_text())
    except ValueError as err:
        raise CheckpointError(f'{manifest} is not valid JSON ({err}); fix it or {REINSTALL}.') \
            from err
    if spec.get('protocol') != protocol:
        raise CheckpointError(f'the weights of {manifest} segment the {spec.get("protocol")} '
                              f'protocol, not {protocol}; use --atlas-library '
                              f'{spec.get("protocol")} or weights trained on {protocol} labels')
    variant = '+'.join(['T1w'] + (['T2w'] if t2w else []) + (['prior'] if prior else []))
    variants = spec.get('variants', {})
    if variant not in variants:
        hint = ' (--t1-only ignores the T2w)' if t2w else ''
        hint += '' if prior else ' (without --no-atlas-prior the prior is used)'
        raise CheckpointError(
            f'{manifest} has no weights for the inputs {variant}; it has '
            f'{sorted(variants) or "none"}. Choose a run with those inputs{hint}, run with '
            f'--models none (the multi-atlas labels), or train weights for {variant} with '
            f'`cerebseg-train segmentation --inputs {" ".join(variant.split("+"))}` and pass '
            'their manifest with --cnn-weights.')
    role = variants[variant].get('role', spec.get('role', 'labels'))
    if role not in ROLES:
        raise CheckpointError(f'{manifest}: the role of the lobule networks of {variant} is '
                              f'{role!r}; it must be "labels" (they decide every label) or '
                              '"outline" (they decide where the cerebellum ends, the prior which '
                              'lobule); fix the manifest')
    if role == 'outline' and not prior:
        raise CheckpointError(f'the lobule networks of {manifest} decide the outline only and '
                              'take the lobules from the atlas prior; run without '
                              '--no-atlas-prior')
    out = {'variant': variant, 'manifest': str(manifest), 'role': role}
    for stage in ('hemisphere', 'lobules'):
        entries = variants[variant].get(stage, [])
        if stage == 'lobules' and models != 'ensemble':
            entries = [e for e in entries if e['architecture'] == models]
        if not entries:
            raise CheckpointError(f'{manifest} has no {stage} network for {variant}'
                                  + (f' with the {models} architecture' if stage == 'lobules'
                                     else '') + '; use --models ensemble or other weights.')
        inputs = {tuple(e['inputs']) for e in entries}
        if len(inputs) > 1:
            raise CheckpointError(f'{manifest}: the {stage} networks of {variant} differ in '
                                  'their inputs')
        files = [manifest.parent / e['file'] for e in entries]
        for f, e in zip(files, entries):
            if not f.is_file():
                raise CheckpointError(f'segmentation weights not found: {f} (listed in '
                                      f'{manifest}); reinstall cerebseg or fix the manifest.')
            verify_shipped(f)
            if e.get('sha256') and sha256sum(f) != e['sha256']:
                raise CheckpointError(f'{f} is corrupt or was changed: its sha256 differs from '
                                      f'the one in {manifest}; train or copy it again, or fix '
                                      'the manifest.')
        out[stage] = {'files': [str(f) for f in files], 'inputs': list(inputs.pop()),
                      'architectures': [e['architecture'] for e in entries]}
    return out


# ------------------------------------------------------------------------ shipped weights

def _manifest_files(manifest: Path) -> dict:
    try:
        stat = manifest.stat()
        return _read_manifest(manifest, stat.st_size, stat.st_mtime_ns)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f'the weights manifest {manifest} is missing or corrupt ({err}); '
                              f'{REINSTALL}.') from err


@lru_cache(maxsize=8)
def _read_manifest(manifest: Path, size: int, mtime_ns: int) -> dict:
    return dict(json.loads(manifest.read_text())['files'])


def shipped_files(manifest=None) -> dict:
    """File name -> ``{'sha256', 'bytes', 'family'}`` of the shipped weights."""
    return _manifest_files(Path(manifest or WEIGHTS_MANIFEST))


@lru_cache(maxsize=64)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    return sha256sum(path)


def verify_shipped(path, manifest=None) -> None:
    """Check a file of :data:`WEIGHTS_DIR` against the weights manifest (CheckpointError when
    its sha256 differs, or when the manifest is missing); files elsewhere, and files the
    manifest does not list (e.g. a ``regnet.pt`` a user put there), pass."""
    path = Path(path).resolve()
    manifest = Path(manifest or WEIGHTS_MANIFEST).resolve()
    if path.parent != manifest.parent:
        return
    entry = _manifest_files(manifest).get(path.name)
    if entry is None:
        return
    stat = path.stat()
    digest = _digest(path, stat.st_size, stat.st_mtime_ns)
    if digest != entry['sha256']:
        raise CheckpointError(
            f'{path} is corrupt or was changed: its sha256 is {digest}, the weights manifest '
            f'{manifest} says {entry["sha256"]}. {REINSTALL[0].upper() + REINSTALL[1:]}, or '
            'pass your own weights (--cnn-weights, --brainstem-weights).')


def write_weights_manifest(folder=None) -> Path:
    """(Re)write ``manifest.json`` of a weights folder: every ``*.pt`` and ``*.json`` file
    with its sha256, size and family (for whoever ships new weights)."""
    folder = Path(folder or WEIGHTS_DIR)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name == 'manifest.json' or path.suffix not in ('.pt', '.json'):
            continue
        family = 'cascade manifest' if path.suffix == '.json' else _family(path)
        files[path.name] = {'sha256': sha256sum(path), 'bytes': path.stat().st_size,
                            'family': family}
    out = folder / 'manifest.json'
    tmp = out.with_name(out.name + '.tmp')
    tmp.write_text(json.dumps({'files': files}, indent=2) + '\n')
    tmp.replace(out)
    return out


def _family(path: Path) -> str:
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    return {CASCADE_FORMAT: 'cascade', BRAINSTEM_FORMAT: 'brainstem'}.get(
        ckpt.get('format'), 'regnet' if ckpt.get('architecture') == 'RegNet' else 'unknown')


def load_encoder_state(path, name: str) -> dict:
    """A torchvision ResNet state dict from a local file, for
    :func:`cerebseg.models.nets2d.build_model` (``encoder_state``)."""
    path = Path(path)
    state = load_torch_file(path, f'pretrained {name} weights', kind='torch state dict')
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict):
        raise CheckpointError(f'{path} does not hold a state dict')
    return state
