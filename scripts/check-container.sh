#!/usr/bin/env bash
# Container check (issue 12): the image segments a real participant as a non-root user with no
# network and gives the same labels and volumes as the pip install on this machine; --version
# matches; a bad input gives the same exit code inside as outside.
#
#   scripts/check-container.sh [WORK]      (after scripts/build-container.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
TAG=${TAG:-cerebseg:${VERSION}}
SHARED=$(realpath "${SHARED:-../shared/data}")
BIDS=$SHARED/bids/multimodal
LABEL=${LABEL:-ixi002}
WORK=$(realpath -m "${1:-work/container-check}")
PY=${PY:-.venv/bin/python}
CEREBSEG=${CEREBSEG:-.venv/bin/cerebseg}   # the pip install to compare with
PODMAN=(podman --runtime runc run --rm --network=none -u 1000:1000)
rm -rf "$WORK" && mkdir -p "$WORK/out-container" "$WORK/out-pip" "$WORK/assets"
chmod 777 "$WORK/out-container"

echo "== version"
inside=$("${PODMAN[@]}" "$TAG" --version)
outside=$("$CEREBSEG" --version)
echo "inside: $inside / outside: $outside"
[ "$inside" = "$outside" ]

echo "== the image's assets, for the pip run (the comparison is about the install)"
cid=$(podman create "$TAG")
podman cp "$cid:/opt/cerebseg/assets/." "$WORK/assets/"
podman rm "$cid" >/dev/null

echo "== participant $LABEL in the container (uid 1000, no network)"
start=$(date +%s)
"${PODMAN[@]}" -v "$BIDS:/data:ro" -v "$WORK/out-container:/out" "$TAG" \
    /data /out participant --participant-label "$LABEL" -w /tmp/work
t_inside=$(( $(date +%s) - start ))
echo "== participant $LABEL with the pip install"
start=$(date +%s)
NIPYPE_NO_ET=1 "$CEREBSEG" "$BIDS" "$WORK/out-pip" participant --participant-label "$LABEL" \
    --assets-dir "$WORK/assets" -w "$WORK/work-pip"
t_outside=$(( $(date +%s) - start ))

echo "== bad input: the non-brain phantom"
mkdir -p "$WORK/bad/sub-01/anat" "$WORK/out-bad" && chmod 777 "$WORK/out-bad"
cp "$SHARED/subjects/nonbrain_phantom/sub-ge01_T1w.nii.gz" "$WORK/bad/sub-01/anat/sub-01_T1w.nii.gz"
printf '{"Name": "bad", "BIDSVersion": "1.10.0"}\n' > "$WORK/bad/dataset_description.json"
set +e
"${PODMAN[@]}" -v "$WORK/bad:/data:ro" -v "$WORK/out-bad:/out" "$TAG" /data /out participant \
    -w /tmp/work > "$WORK/bad-inside.log" 2>&1
rc_inside=$?
NIPYPE_NO_ET=1 "$CEREBSEG" "$WORK/bad" "$WORK/out-bad-pip" participant --assets-dir \
    "$WORK/assets" -w "$WORK/work-bad" > "$WORK/bad-outside.log" 2>&1
rc_outside=$?
set -e
echo "bad input exit code: inside $rc_inside, outside $rc_outside"
[ "$rc_inside" = "$rc_outside" ] && [ "$rc_inside" = 65 ]

echo "== compare"
"$PY" - "$WORK/out-container" "$WORK/out-pip" "$LABEL" <<'PYEOF'
import csv, sys
from pathlib import Path
import nibabel as nib, numpy as np
a, b, label = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
worst = 0.0
for seg in ('cerebellum', 'brainstem'):
    name = f'sub-{label}/anat/sub-{label}_space-T1w_seg-{seg}_dseg.nii.gz'
    la, lb = (np.asarray(nib.load(p / name).dataobj) for p in (a, b))
    differ = int((la != lb).sum())
    va, vb = ({r['name']: float(r['volume_mm3']) for r in csv.DictReader(open(
        p / f'sub-{label}/anat/sub-{label}_seg-{seg}_morph.tsv'), delimiter='\t')} for p in (a, b))
    rel = max(abs(va[k] - vb[k]) / max(vb[k], 1e-9) for k in vb if vb[k] > 0)
    worst = max(worst, rel)
    print(f'{seg}: {differ} of {la.size} voxels differ, largest volume difference '
          f'{100 * rel:.3f} %')
    assert differ == 0, f'{seg} labels differ in {differ} voxels'
    assert rel <= 0.001, f'{seg} volumes differ by {100 * rel:.3f} %'
anat = sorted(p.relative_to(a) for p in (a / f'sub-{label}/anat').rglob('*') if p.is_file())
same = [f for f in anat if (a / f).read_bytes() == (b / f).read_bytes()]
print(f'{len(same)} of {len(anat)} files of sub-{label}/anat byte-identical')
owner = {p.stat().st_uid for p in a.rglob('*')}
print(f'outputs owned by uid {sorted(owner)}')
PYEOF
echo "time: container ${t_inside} s, pip ${t_outside} s"
podman image inspect "$TAG" --format 'image size: {{.Size}} bytes'
echo "container check passed"
