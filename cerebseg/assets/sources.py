"""The public source files that the assets are built from, and the lookup-table format they
are written in; shared by :mod:`~cerebseg.assets.build`, :mod:`~cerebseg.assets.brainstem_atlas` and
:mod:`~cerebseg.assets.reference`."""
from __future__ import annotations

from pathlib import Path

from cerebseg.errors import MissingAssetError


def source_path(sources: Path, rel: str) -> Path:
    """``sources/rel``, which must be a file (MissingAssetError: exit 126, with the fix)."""
    path = sources / rel
    if not path.is_file():
        raise MissingAssetError(
            f'Source file missing: {path}. Point --sources at a folder with the public source '
            'files (the layout of cerebseg/data/sources.json), or run `cerebseg-assets fetch`.')
    return path


def lut_to_tsv(lut: list[dict], columns=('index', 'name', 'abbreviation', 'color')) -> str:
    """A BIDS ``dseg.tsv``: one row per label, ``columns`` in that order."""
    lines = ['\t'.join(columns)]
    lines += ['\t'.join(str(r[c]) for c in columns) for r in lut]
    return '\n'.join(lines) + '\n'
