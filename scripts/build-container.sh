#!/usr/bin/env bash
# Build the cerebseg image with podman on a Debian machine, as verified in issue 12:
# a base image made from Debian's packages (no registry pull), the CPU torch wheel in the build
# context, the assets built from a local sources folder, then a docker-archive tarball that
# `docker load` and `apptainer build cerebseg.sif docker-archive://...` accept.
#
#   scripts/build-container.sh            SOURCES=../shared/data OUT=dist BASE=localhost/debian:bookworm
# Needs: apt-get install podman runc mmdebstrap (root).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
SOURCES=$(realpath "${SOURCES:-../shared/data}")
OUT=${OUT:-dist}
BASE=${BASE:-localhost/debian:bookworm}
TAG=${TAG:-cerebseg:${VERSION}}
CA=/etc/ssl/certs/ca-certificates.crt
PODMAN=(podman --runtime runc)

if [ ! -f /etc/containers/containers.conf ] || ! grep -q default_ulimits /etc/containers/containers.conf; then
    mkdir -p /etc/containers   # setrlimit is refused in some sandboxes
    printf '[containers]\ndefault_ulimits = []\n' >> /etc/containers/containers.conf
fi
if ! "${PODMAN[@]}" image exists "$BASE"; then
    echo "Making the base image $BASE from Debian's packages"
    tmp=$(mktemp -d)
    mmdebstrap --variant=minbase --include=ca-certificates bookworm "$tmp/base.tar"
    "${PODMAN[@]}" import "$tmp/base.tar" "$BASE"
    rm -rf "$tmp"
fi
mkdir -p .container/wheels
if ! ls .container/wheels/torch-2.13.0*.whl >/dev/null 2>&1; then
    # for the image's Python (Debian bookworm: 3.11), whatever the Python of this machine
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 --dest .container/wheels torch==2.13.0
fi
start=$(date +%s)
"${PODMAN[@]}" build --network=host -v "$CA:$CA:ro" --env PIP_CERT="$CA" \
    -v "$SOURCES:/sources:ro" --build-arg BASE="$BASE" --build-arg ASSETS_SOURCES=/sources \
    -t "$TAG" .
echo "Built $TAG in $(( $(date +%s) - start )) s"
mkdir -p "$OUT"
"${PODMAN[@]}" save --format docker-archive -o "$OUT/cerebseg-${VERSION}.tar" "$TAG"
"${PODMAN[@]}" image inspect "$TAG" --format 'Image size: {{.Size}} bytes'
ls -l "$OUT/cerebseg-${VERSION}.tar"
