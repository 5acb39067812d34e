"""The run configuration: a frozen dataclass, dumped as TOML for provenance."""
from __future__ import annotations

import argparse
import dataclasses
import uuid
from datetime import datetime, timezone
from pathlib import Path

import tomli_w

from cerebseg import __version__
from cerebseg.assets import DEFAULT_LIBRARY


@dataclasses.dataclass(frozen=True)
class RunConfig:
    bids_dir: str
    output_dir: str
    work_dir: str
    analysis_level: str
    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    bids_filter_file: str = ''
    t1_only: bool = False
    skip_bids_validation: bool = False
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float = 0.0
    plugin: str = ''
    plugin_args: str = ''   # JSON
    device: str = 'auto'
    atlas_library: str = DEFAULT_LIBRARY
    affine_fit: str = 'symmetric'
    registration: str = 'torch'
    fusion_search: str = 'auto'
    fusion_nonlocal_weight: str = 'auto'
    outline: str = 'auto'
    lobule_borders: str = 'auto'
    lobule_votes: str = 'auto'
    models: str = 'none'
    skip_brainstem: bool = False
    skip_cerebellum: bool = False
    brainstem_method: str = 'atlas'
    brainstem_weights: str = ''
    no_atlas_prior: bool = False
    cnn_weights: str = ''
    assets_dir: str = ''
    random_seed: int = 0
    stop_on_first_crash: bool = False
    group_by: str = ''
    verbose: int = 0
    run_uuid: str = ''
    version: str = __version__

    @classmethod
    def from_namespace(cls, opts: argparse.Namespace) -> 'RunConfig':
        stamp = datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')
        values = {}
        for field in dataclasses.fields(cls):
            if field.name in ('run_uuid', 'version'):
                continue
            val = getattr(opts, field.name, None)
            if val is None:
                continue
            if isinstance(val, Path):
                val = str(val)
            elif isinstance(val, list):
                val = tuple(val)
            values[field.name] = val
        return cls(run_uuid=f'{stamp}_{uuid.uuid4().hex[:8]}', **values)

    def to_toml(self) -> str:
        data = {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}
        return tomli_w.dumps({'cerebseg': data})

    @classmethod
    def from_toml(cls, text: str) -> 'RunConfig':
        import tomllib

        data = tomllib.loads(text)['cerebseg']
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})
