"""Quality-control flags of one participant's results (plain functions on numbers).

Each flag is ``{'kind', 'structure', 'message'}``; the participant report lists them and the
group level gathers them. The bounds are named constants, documented in the README.
"""
from __future__ import annotations

from cerebseg.utils.group_stats import asymmetry_index, pair_structures
from cerebseg.utils.registration import MIRROR_FIT_TOLERANCE_MM

#: TemplateFitCorrelation (the brain's correlation with the template after the affine) below
#: this: a poor fit worth a look (ds002748: 0.51-0.61, IXI002 0.66; below the sidecar's
#: TemplateFitMinimum, 0.25, a run is refused)
POOR_TEMPLATE_FIT = 0.4
#: TemplateFitMirrorDistanceMM (how far apart the affine fits of the T1w and of its mirror
#: were in the posterior fossa) above this: one fit failed and the other was kept alone
MIRROR_FIT_DISTANCE_MM = MIRROR_FIT_TOLERANCE_MM
#: T2wToT1wEdgeCorrelation below this: a doubtful T2w -> T1w fit
POOR_T2_FIT = 0.4
#: |left - right| / mean above this, for structures of at least MIN_ASYMMETRY_VOLUME_MM3
MAX_ASYMMETRY = 0.15
#: smaller structures are left out of the asymmetry check (a few voxels swing the index)
MIN_ASYMMETRY_VOLUME_MM3 = 200.0
#: mean disagreement of the lobule networks within a label (0-1) above this
MAX_UNCERTAINTY = 0.25


def _flag(kind: str, structure: str | None, message: str) -> dict:
    return {'kind': kind, 'structure': structure, 'message': message}


def fit_flags(meta: dict) -> list[dict]:
    """Flags from a dseg sidecar's fit figures (template fit, T2w fit)."""
    flags = []
    fit = meta.get('TemplateFitCorrelation')
    if fit is not None and fit < POOR_TEMPLATE_FIT:
        flags.append(_flag('template_fit', None,
                           f'poor fit to the template: correlation {fit:.2f} < '
                           f'{POOR_TEMPLATE_FIT} (check the registration figure)'))
    mirror = meta.get('TemplateFitMirrorDistanceMM')
    if mirror is not None and mirror > MIRROR_FIT_DISTANCE_MM:
        flags.append(_flag('template_fit', None,
                           f'the affine fits of the T1w and of its mirror differ by {mirror:.1f} '
                           f'mm (> {MIRROR_FIT_DISTANCE_MM}); the better one was used alone, so '
                           'left and right may not be treated alike (check the registration '
                           'figure)'))
    t2 = meta.get('T2wToT1wEdgeCorrelation')
    if t2 is not None and t2 < POOR_T2_FIT:
        flags.append(_flag('t2w_fit', None, f'doubtful T2w to T1w fit: edge correlation '
                                             f'{t2:.2f} < {POOR_T2_FIT}'))
    return flags


def field_of_view_flags(meta: dict, structure: str) -> list[dict]:
    """A flag when a dseg sidecar's ``FieldOfView`` (:func:`cerebseg.utils.native.
    outside_report`) says that more than its limit of the whole structure lies outside the
    image. Labels cut off above the limit are not measured (n/a) whether or not the whole
    structure is flagged: an image that clips the tip of the tonsils leaves the cerebellum's
    total within the limit but lobule IX not measured."""
    fov = meta.get('FieldOfView') or {}
    whole, limit = fov.get('WholeShareOutside', 0.0), fov.get('Limit', 0.0)
    if not whole > limit:
        return []
    cut = fov.get('NotMeasured') or []
    shares = fov.get('ShareOutside', {})
    most = ', '.join(f'{n} {100 * shares.get(n, 0):.0f} %' for n in cut[:3])
    return [_flag('field_of_view', structure,
                  f'the image ends inside the {structure}: about {100 * whole:.0f} % of it lies '
                  f'outside the image ({most}); the volumes of {len(cut)} label(s) and their '
                  'sums are not measured (n/a)')]


def asymmetry_flags(volumes: dict[str, float], bound: float = MAX_ASYMMETRY,
                    min_volume: float = MIN_ASYMMETRY_VOLUME_MM3,
                    baseline: dict[str, float] | None = None) -> list[dict]:
    """Left/right pairs whose asymmetry index differs from ``baseline`` (structure -> the
    label set's own index; default 0) by more than ``bound`` (both sides at least
    ``min_volume`` mm^3; a missing side is always flagged)."""
    baseline = baseline or {}
    flags = []
    for structure, left, right in pair_structures(volumes):
        lv, rv = volumes[left], volumes[right]
        if (lv == 0) != (rv == 0):
            flags.append(_flag('asymmetry', structure,
                               f'{structure}: one side is empty (left {lv:.0f}, right '
                               f'{rv:.0f} mm3)'))
            continue
        if min(lv, rv) < min_volume:
            continue
        ai = float(asymmetry_index(lv, rv))
        expected = baseline.get(structure, 0.0)
        if abs(ai - expected) > bound:
            flags.append(_flag('asymmetry', structure,
                               f'{structure}: left/right asymmetry {ai:+.2f}, beyond the '
                               f"label set's own {expected:+.2f} by more than {bound} "
                               f'(left {lv:.0f}, right {rv:.0f} mm3)'))
    return flags


def label_asymmetry(counts: dict[str, float]) -> dict[str, float]:
    """The asymmetry index of every left/right pair of a label set (structure -> index), from
    its label sizes: the baseline of :func:`asymmetry_flags`."""
    return {s: float(asymmetry_index(counts[lft], counts[rgt]))
            for s, lft, rgt in pair_structures(counts)}


def reference_volumes(volumes: dict[str, float], mapping: dict[str, dict[str, float]]
                      ) -> dict[str, float]:
    """The reference structures' volumes from cerebseg's labels (``mapping``: reference
    structure -> {label: weight}); ``Total``: the sum of all mapped labels."""
    out = {}
    for ref, parts in mapping.items():
        if all(p in volumes for p in parts):
            out[ref] = sum(volumes[p] * w for p, w in parts.items())
    if out and len(out) == len(mapping):
        out['Total'] = sum(out.values())
    return out


def reference_flags(volumes: dict[str, float], ranges: dict[str, dict],
                    mapping: dict[str, dict[str, float]]) -> list[dict]:
    """Structures whose volume lies outside the reference range (``ranges``: structure ->
    ``low``, ``high`` in mm^3)."""
    flags = []
    for ref, value in reference_volumes(volumes, mapping).items():
        rng = ranges.get(ref)
        if rng is None:
            continue
        if not rng['low'] <= value <= rng['high']:
            flags.append(_flag('reference_range', ref,
                               f'{ref}: {value:.0f} mm3 outside the reference range '
                               f'{rng["low"]:.0f}-{rng["high"]:.0f} mm3'))
    return flags


def uncertainty_flags(uncertainty: dict[str, float], bound: float = MAX_UNCERTAINTY
                      ) -> list[dict]:
    """Labels where the lobule networks disagree more than ``bound`` on average."""
    return [_flag('ensemble_disagreement', name,
                  f'{name}: mean network disagreement {value:.2f} > {bound}')
            for name, value in uncertainty.items() if value is not None and value > bound]
