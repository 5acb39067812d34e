"""From working-grid probabilities to native-space labels, and label volumes."""
from __future__ import annotations

import numpy as np


def probabilities_to_native(probseg, reference, transform: str, *,
                            foreground_first: bool = False, with_foreground: bool = False):
    """Resample per-label probabilities (nibabel 4D, labels last) into ``reference``'s grid.

    Each label's probability is resampled with linear interpolation through the inverse of
    ``transform`` (native -> MNI affine, ANTs), then the label of highest probability wins
    (ties to the lower index). Outside the working box the background probability is 1.
    This keeps thin lobules that a nearest-neighbour resampling of a label image would lose.
    ``foreground_first``: the decision of :func:`decide_labels` (the structure's outline first),
    for label sets that split one structure into many labels (the brainstem).

    Only the part of the native grid that the working box reaches is resampled: one linear
    resampling of the box's support finds it (a native voxel outside it gets the default
    values, background 1), and every label is resampled on that crop of the grid (the
    cerebellum's box covers about a tenth of a whole-head T1w).

    Returns the native label array (int16) on ``reference``'s grid; with ``with_foreground``
    also the probability of the structure (the labels 1 .. L-1 together, float32, 0 outside
    the box).
    """
    import ants
    import nibabel as nib

    from cerebseg.utils.images import nib_to_ants

    proxy = probseg.dataobj
    if hasattr(proxy, 'get_unscaled'):  # uint8 on disk: keep it compact, scale per label
        raw, slope, inter = np.asarray(proxy.get_unscaled()), proxy.slope, proxy.inter
    else:
        raw, slope, inter = np.asarray(proxy), 1.0, 0.0
    n_labels = probseg.shape[3]
    shape = tuple(reference.shape)
    labels = np.zeros(shape, np.int16)
    whole = np.zeros(shape, np.float32) if with_foreground else None
    support = ants.apply_transforms(
        reference, nib_to_ants(nib.Nifti1Image(np.ones(probseg.shape[:3], np.float32),
                                               probseg.affine)),
        [transform], interpolator='linear', whichtoinvert=[True], defaultvalue=0.0).numpy()
    inside = np.argwhere(support > 0)
    if not len(inside):
        return (labels, whole) if with_foreground else labels
    lo = np.maximum(inside.min(0) - 1, 0)
    hi = np.minimum(inside.max(0) + 1, np.array(shape) - 1)
    crop = ants.crop_indices(reference, lo.tolist(), (hi + 1).tolist())
    best = background = foreground = sub = None
    for lab in range(n_labels):
        vol = raw[..., lab].astype(np.float32) * np.float32(slope) + np.float32(inter)
        moving = nib_to_ants(nib.Nifti1Image(vol, probseg.affine))
        res = ants.apply_transforms(crop, moving, [transform], interpolator='linear',
                                    whichtoinvert=[True], defaultvalue=1.0 if lab == 0 else 0.0)
        prob = res.numpy()
        if best is None:
            background, foreground = prob, np.zeros_like(prob)
            best = prob if not foreground_first else np.full_like(prob, -1.0)
            sub = np.zeros(prob.shape, np.int16)
            continue
        foreground += prob
        better = prob > best
        best = np.where(better, prob, best)
        sub[better] = lab
    if foreground_first:
        sub[foreground <= background] = 0
    box = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    labels[box] = sub
    if with_foreground:
        whole[box] = np.clip(foreground, 0.0, 1.0)
        return labels, whole
    return labels


def decide_labels(probs: np.ndarray, foreground_first: bool = False) -> np.ndarray:
    """Labels from probabilities ``(L, ...)`` (label 0: background): the most probable label,
    or with ``foreground_first`` the outline first (foreground where the labels 1 .. L-1
    together outweigh the background), then its most probable label.

    A plain arg-max shrinks a structure split into many labels: where its surface meets the
    background, background 0.45 against white matter 0.35 and grey matter 0.20 is background,
    though the structure holds 0.55 (brainstem label set: the outline 0.25 % smaller on the
    1 mm box, issue 10).
    """
    probs = np.asarray(probs)
    if not foreground_first:
        return np.argmax(probs, axis=0).astype(np.int16)
    inside = probs[1:].sum(axis=0) > probs[0]
    return np.where(inside, 1 + np.argmax(probs[1:], axis=0), 0).astype(np.int16)


def label_volumes(labels: np.ndarray, zooms, n_labels: int) -> np.ndarray:
    """Volume (mm^3) of every label index ``0 .. n_labels - 1`` in a label array."""
    counts = np.bincount(np.asarray(labels, np.int64).ravel(), minlength=n_labels)[:n_labels]
    return counts * float(np.prod(zooms))


def morph_table(labels: np.ndarray, zooms, lut: list[dict], icv_mm3: float,
                uncertainty: dict | None = None, summary=None,
                not_measured=()) -> str:
    """BIDS-style TSV: index, name, volume_mm3, volume_icv_fraction (one row per non-0 label),
    and ``uncertainty`` (``{index: text}``, the networks' mean disagreement) when given.

    ``summary``: a function ``({index: volume_mm3}, lut) -> [(name, volume_mm3), ...]`` whose
    rows (sums of labels, e.g. the brainstem parts) are appended with index ``n/a``.
    ``not_measured``: label indices whose volume is written ``n/a`` (the image ends inside
    them, :func:`outside_report`), and so is every summary row that adds them up.
    """
    vols = label_volumes(labels, zooms, max(r['index'] for r in lut) + 1)
    vols[list(not_measured)] = np.nan

    def _cells(vol):
        return 'n/a\tn/a' if np.isnan(vol) else f'{vol:.1f}\t{vol / icv_mm3:.6e}'

    lines = ['index\tname\tvolume_mm3\tvolume_icv_fraction'
             + ('\tuncertainty' if uncertainty is not None else '')]
    for row in lut:
        if row['index'] == 0:
            continue
        line = f"{row['index']}\t{row['name']}\t{_cells(vols[row['index']])}"
        if uncertainty is not None:
            line += f"\t{uncertainty.get(row['index'], 'n/a')}"
        lines.append(line)
    if summary is not None:
        for name, vol in summary({r['index']: float(vols[r['index']]) for r in lut}, lut):
            lines.append(f'n/a\t{name}\t{_cells(vol)}'
                         + ('\tn/a' if uncertainty is not None else ''))
    return '\n'.join(lines) + '\n'


def read_lut_tsv(path) -> list[dict]:
    import csv

    with open(path, newline='', encoding='utf-8') as fobj:
        rows = list(csv.DictReader(fobj, delimiter='\t'))
    for row in rows:
        row['index'] = int(row['index'])
    return rows


#: share of a label (of the library entries' labels as the affine places them) outside the
#: input image above which its native volume is not measured: the image ends inside it; the
#: field_of_view flag uses the same limit for the whole structure (issue 23: a crop that
#: removes more than 2 % of the cerebellum is flagged)
MAX_OUTSIDE_IMAGE = 0.02


def outside_image(label_maps, reference, transform: str, n_labels: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """How much of each label lies outside the image whose grid is ``reference`` (ANTs image),
    as the library places the anatomy by the affine alone: ``(outside, total)``, two
    ``(n_labels,)`` arrays of voxels summed over ``label_maps`` (nibabel label images in MNI
    space: the library entries' or the label set's own; label 0 left at 0).

    The working grid covers the whole of cerebellum and brainstem whatever the input's field of
    view, and the native-to-MNI affine (fitted on the whole head, then on the posterior fossa)
    puts each entry's anatomy there as it continues beyond an image that ends inside it (a slab
    cut off below or behind). Each voxel of an entry counts by how much of it the input image
    does not cover (the image grid's support resampled linearly onto the entry's grid through
    ``transform``, native -> MNI). The entries are read as the affine places them, not as the
    deformable registration does: the registration pulls them into the image where it ends
    (ds002748 sub-03 with its lowest 18 mm of cerebellum cut off, 25 % of its cerebellum: 16 %
    of the registered library's probability outside the image, 22-25 % of each entry's labels).
    """
    import ants
    import nibabel as nib

    from cerebseg.utils.images import nib_to_ants

    ones = reference.new_image_like(np.ones(reference.shape, np.float32))
    outside, total = np.zeros(n_labels), np.zeros(n_labels)
    missing = {}
    for img in label_maps:
        key = (img.shape[:3], img.affine.tobytes())
        if key not in missing:
            grid = nib_to_ants(nib.Nifti1Image(np.zeros(img.shape[:3], np.float32), img.affine))
            covered = ants.apply_transforms(grid, ones, [transform], interpolator='linear',
                                            defaultvalue=0.0).numpy()
            missing[key] = np.clip(1.0 - covered, 0.0, 1.0).ravel().astype(np.float64)
        labels = np.asarray(img.dataobj).astype(np.int64).ravel()
        labels[(labels < 0) | (labels >= n_labels)] = 0
        total += np.bincount(labels, minlength=n_labels)[:n_labels]
        outside += np.bincount(labels, weights=missing[key], minlength=n_labels)[:n_labels]
    outside[0] = total[0] = 0.0
    return outside, total


def outside_report(outside, total, lut: list[dict], limit: float = MAX_OUTSIDE_IMAGE) -> dict:
    """The sidecar's ``FieldOfView`` from :func:`outside_image`: the share of the whole
    structure (every label but 0) outside the image, and every label whose own share is above
    ``limit`` (``NotMeasured``, largest share first; ``ShareOutside``: their shares)."""
    outside, total = np.asarray(outside, float), np.asarray(total, float)
    whole = float(outside[1:].sum() / total[1:].sum()) if total[1:].sum() > 0 else 0.0
    shares = np.divide(outside, total, out=np.zeros_like(outside), where=total > 0)
    names = {row['index']: row['name'] for row in lut}
    cut = {names[i]: round(float(s), 4) for i, s in enumerate(shares)
           if i > 0 and i in names and s > limit}
    return {'Limit': limit, 'WholeShareOutside': round(whole, 4),
            'NotMeasured': sorted(cut, key=lambda n: (-cut[n], n)), 'ShareOutside': cut}
