# cerebseg container. CPU by default; for CUDA, for example:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t cerebseg .
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
RUN if ! command -v python >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-pip \
        && ln -s /usr/bin/python3 /usr/local/bin/python && rm -rf /var/lib/apt/lists/*; fi

FROM base AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN python -m pip wheel --no-deps -w /wheels /src

FROM base
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY constraints.txt /tmp/constraints.txt
COPY --from=build /wheels /wheels
# the README's installation: torch pinned by the constraints file, then cerebseg
RUN python -m pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0 \
    && python -m pip install --no-cache-dir -c /tmp/constraints.txt /wheels/*.whl \
    && rm -rf /wheels
ENV NIPYPE_NO_ET=1 OMP_NUM_THREADS=1 CEREBSEG_CONTAINER=docker \
    CEREBSEG_ASSETS=/opt/cerebseg/assets HOME=/home/cerebseg
# templates and atlases: downloaded from their public URLs and built now, never at run time
RUN cerebseg-assets fetch --out /opt/cerebseg/assets --sources /tmp/sources \
        --library suit --library cobra \
    && rm -rf /tmp/sources
RUN useradd --create-home --home-dir /home/cerebseg cerebseg && chmod -R go=u /home/cerebseg
USER cerebseg
WORKDIR /tmp
ENTRYPOINT ["cerebseg"]
