"""The two brainstem methods: the atlas label set carried onto a subject, or a 2D network.

The brainstem label set (:mod:`cerebseg.assets.brainstem_atlas`) lives on the 1 mm brainstem box of
MNI152NLin2009cAsym (:data:`cerebseg.utils.grid.BRAINSTEM_GRID`) with the template's brain T1w.
A subject's T1w is put on the same box by its MNI affine (the one the cerebellum uses), and the
template is registered onto it by cerebseg's diffeomorphic registration
(:func:`cerebseg.models.registration.register_svf` with
:data:`~cerebseg.models.registration.BRAINSTEM_CONFIG`, similarity measured over the whole box
of the subject's grid); the labels follow as probabilities (one-hot maps warped linearly), so
that the native resampling can interpolate them like the cerebellar ones. This is the atlas-registration method
of issue 10 (the baseline the networks must beat, and their training labels);
:func:`segment_with_network` is the 2D network (N-DecoNet) on axial slices.
"""
from __future__ import annotations

import logging

import numpy as np

LOGGER = logging.getLogger('cerebseg.models.brainstem_methods')


def register_label_set(subject: np.ndarray, template: np.ndarray, labels: np.ndarray,
                       n_labels: int, *, spacing: float = 1.0, config=None, seed: int = 0,
                       device='cpu') -> tuple[np.ndarray, np.ndarray]:
    """Carry the label set onto one subject's brainstem box.

    ``subject`` and ``template`` are (X, Y, Z) images on the same grid (the subject normalised
    by cerebseg's preprocessing; the template is normalised here, inside its own foreground),
    ``labels`` the template's label map (values ``0 .. n_labels - 1``).

    Returns ``(probabilities, dseg)``: ``(n_labels, X, Y, Z)`` float32 summing to 1 where the
    template has data (background 1 outside), and the labels
    (:func:`cerebseg.utils.native.decide_labels`, the outline first).
    """
    import torch

    from cerebseg.models import registration as reg
    from cerebseg.utils.native import decide_labels
    from cerebseg.utils.preproc import normalise_intensity

    subject = np.asarray(subject, np.float32)
    template = np.asarray(template, np.float32)
    labels = np.asarray(labels)
    if subject.shape != template.shape or labels.shape != template.shape:
        raise ValueError(f'subject {subject.shape}, template {template.shape} and labels '
                         f'{labels.shape} must be on the same grid')
    if labels.min() < 0 or labels.max() >= n_labels:
        raise ValueError(f'labels must lie in 0..{n_labels - 1}; found {labels.min()}..'
                         f'{labels.max()}')
    moving = normalise_intensity(template, template > 0)
    whole_box = np.ones((1,) + subject.shape, np.float32)   # see BRAINSTEM_CONFIG
    result = reg.register_svf(subject, moving[None], spacing=spacing, mask=whole_box,
                              config=config or reg.BRAINSTEM_CONFIG, device=device, seed=seed)
    onehot = np.zeros((n_labels,) + labels.shape, np.float32)
    np.put_along_axis(onehot, labels[None].astype(np.int64), 1.0, axis=0)
    with torch.no_grad():
        warped = reg.apply_svf(result, onehot[None], order=1, device=device)[0]
    warped = np.clip(warped, 0.0, None)
    total = warped.sum(axis=0)
    warped[0] += np.clip(1.0 - total, 0.0, None)     # outside the template: background
    warped /= np.maximum(warped.sum(axis=0), 1e-6)
    LOGGER.info('Brainstem label set registered: final similarity loss %s',
                result.losses[-1][1] if result.losses else 'n/a')
    return warped.astype(np.float32), decide_labels(warped, foreground_first=True)


def segment_with_network(t1_box: np.ndarray, weights, lut_names: list[str], *, device='cpu',
                         batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The brainstem of one subject's box by a trained 2D network (issue 10's N-DecoNet).

    ``t1_box`` is the subject's normalised T1w on the brainstem box (as for
    :func:`register_label_set`), ``weights`` a checkpoint of
    :func:`cerebseg.models.checkpoint.save_brainstem_net` trained by ``cerebseg-train brainstem``;
    ``lut_names`` the label names of the assets' lookup table, which must be the network's
    classes (same names, same order; :class:`~cerebseg.models.checkpoint.CheckpointError`
    otherwise). Every axial slice is segmented with the checkpoint's slicing
    (:func:`cerebseg.models.inference.predict_volume`).

    Returns ``(probabilities, dseg)`` as :func:`register_label_set` does.
    """
    from cerebseg.models.checkpoint import CheckpointError, load_brainstem_net
    from cerebseg.models.inference import predict_volume
    from cerebseg.utils.native import decide_labels

    model, meta = load_brainstem_net(weights, device=device)
    if list(meta['labels']) != list(lut_names):
        raise CheckpointError(
            f'{weights} was trained on {len(meta["labels"])} brainstem labels that are not '
            f'the {len(lut_names)} of the assets\' lookup table (first difference: '
            f'{_first_difference(meta["labels"], lut_names)}); train weights on this label set '
            '(cerebseg-train brainstem) or use --brainstem-method atlas')
    if meta['channels'] != [c for c in meta['channels'] if c.startswith('T1w')]:
        raise CheckpointError(f'{weights} needs the input channels {meta["channels"]}; '
                              'the brainstem stage gives the T1w only')
    slicing = dict((meta.get('meta') or {}).get('slicing') or {})
    if not slicing:
        raise CheckpointError(f'{weights} does not record its slicing (meta.slicing); train it '
                              'with cerebseg-train brainstem')
    probs = predict_volume(model, np.asarray(t1_box, np.float32), **slicing,
                           batch_size=batch_size, device=device)
    return probs, decide_labels(probs, foreground_first=True)


def _first_difference(a, b) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f'class {i}: {x!r} against {y!r}'
    return f'{len(a)} against {len(b)} classes'
