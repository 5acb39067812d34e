# cerebseg container: the README's installation in a virtual environment, assets and weights
# baked in, run as a non-root user (any uid works: HPC sites run with -u $(id -u)).
#
#   scripts/build-container.sh            (this machine: local Debian base, local torch wheel)
#   docker build -t cerebseg:0.1.0 .       (users: public base, torch from TORCH_INDEX,
#                                          assets fetched from their public URLs)
# CUDA: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 (untested here: no GPU).
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BASE} AS base
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        ca-certificates libgomp1 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

# the wheel with the compiled (Cython + OpenMP) kernel
FROM base AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential python3-dev \
        && rm -rf /var/lib/apt/lists/*
RUN pip install "setuptools>=77" wheel "cython>=3.0"
COPY pyproject.toml setup.py README.md constraints.txt /src/
COPY cerebseg /src/cerebseg
RUN pip wheel --no-deps --no-build-isolation -w /wheels /src

FROM base
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG ASSETS_SOURCES=fetch
# torch first, pinned by the constraints file: a CPU wheel put in the build context
# (.container/wheels/, by scripts/build-container.sh), else the one TORCH_INDEX serves
# (the glob lets the build go on without that folder)
COPY constraints.txt .containe[r] /tmp/ctx/
RUN if ls /tmp/ctx/wheels/torch-*.whl >/dev/null 2>&1; then pip install /tmp/ctx/wheels/torch-*.whl; \
    else pip install --index-url ${TORCH_INDEX} torch==2.13.0; fi \
    && mv /tmp/ctx/constraints.txt /tmp/constraints.txt && rm -rf /tmp/ctx
COPY --from=build /wheels /wheels
RUN pip install -c /tmp/constraints.txt /wheels/*.whl && rm -rf /wheels \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# templates and atlases: built now (from a mounted sources folder, or downloaded from their
# public URLs), never at run time
RUN if [ "${ASSETS_SOURCES}" = fetch ]; then \
        cerebseg-assets fetch --out /opt/cerebseg/assets --sources /tmp/sources && rm -rf /tmp/sources; \
    else cerebseg-assets build --sources "${ASSETS_SOURCES}" --out /opt/cerebseg/assets; fi \
    && chmod -R a+rX /opt/cerebseg
RUN useradd --uid 1000 --create-home --home-dir /home/cerebseg cerebseg \
    && chmod -R 1777 /home/cerebseg
ENV NIPYPE_NO_ET=1 OMP_NUM_THREADS=1 CEREBSEG_CONTAINER=docker \
    CEREBSEG_ASSETS=/opt/cerebseg/assets HOME=/home/cerebseg MPLCONFIGDIR=/tmp/matplotlib
USER cerebseg
WORKDIR /tmp
ENTRYPOINT ["cerebseg"]
