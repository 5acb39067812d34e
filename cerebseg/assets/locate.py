"""Find and verify the assets: ``--assets-dir``, then ``$CEREBSEG_ASSETS``, then the cache."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cerebseg.assets import ASSETS_FORMAT, MANIFEST, registration_control_mm, user_cache_dir
from cerebseg.errors import MissingAssetError
from cerebseg.utils.images import sha256sum

BUILD_HINT = ('Build them with `cerebseg-assets build --sources DIR --out DIR` (DIR holding the '
              'public source files) or `cerebseg-assets fetch --out DIR`, then pass '
              '`--assets-dir DIR` or set CEREBSEG_ASSETS=DIR.')


@dataclass(frozen=True)
class Assets:
    root: Path
    manifest: dict

    def path(self, rel: str) -> Path:
        return self.root / rel

    def library(self, name: str) -> dict:
        libs = self.manifest['libraries']
        if name not in libs:
            other = (f' Or run with the library these assets hold: --atlas-library '
                     f'{sorted(libs)[0]}.' if libs else '')
            raise MissingAssetError(
                f'The atlas library {name!r} is not in {self.root} (it has {sorted(libs)}). '
                + BUILD_HINT.replace('build --sources', f'build --library {name} --sources')
                + other)
        return libs[name]

    def brainstem(self) -> dict:
        """The manifest's brainstem section (label set, T1w and lookup table on its box)."""
        section = self.manifest.get('brainstem')
        if not section:
            raise MissingAssetError(
                f'The assets in {self.root} have no brainstem label set (built with '
                '--no-brainstem or by an older cerebseg). ' + BUILD_HINT)
        return section

    def reference(self) -> dict | None:
        """The reference volume ranges (``structures``: name -> low, high, pipelines), or
        None for assets built before they existed."""
        section = self.manifest.get('reference')
        if not section:
            return None
        return json.loads(self.path(section['cerebellum_volumes']).read_text())

    def library_paths(self, name: str) -> dict:
        """The atlas library ``name`` as the workflows take it: every entry's files with
        absolute paths, ``n_labels``, the lookup table, citation, licence and entry info;
        ``votes`` (entries, ``n_labels``, ``weight``, and ``control_mm``, the registration
        control grid of their own protocol) where the library has lobule votes."""
        lib = self.library(name)
        entries = [{k: str(self.path(v)) for k, v in e['files'].items()}
                   for e in lib['entries']]
        out = {'name': name, 'entries': entries, 'n_labels': lib['n_labels'],
               'lut': str(self.path(lib['lut'])), 'citation': lib['citation'],
               'licence': lib['licence'], 'entry_info': lib['entries']}
        votes = lib.get('lobule_votes')
        if votes and votes['entries']:
            out['votes'] = {'protocol': votes['protocol'], 'weight': votes['weight'],
                            'control_mm': registration_control_mm({'name': votes['protocol']}),
                            'n_labels': votes['n_labels'],
                            'entries': [{k: str(self.path(v)) for k, v in e['files'].items()}
                                        for e in votes['entries']],
                            'names': [e['name'] for e in votes['entries']]}
        return out

    def template_paths(self) -> dict:
        """Absolute paths of the MNI template ``head``, ``brain``, ``mask``, and ``icv_ml``."""
        tpl = self.manifest['templates']
        return {'head': str(self.path(tpl['head'])), 'brain': str(self.path(tpl['brain'])),
                'mask': str(self.path(tpl['mask'])), 'icv_ml': tpl['brain_mask_volume_ml']}

    @property
    def restricted(self) -> bool:
        """Built with a user's Brainstem Navigator: must not leave this machine."""
        return bool(self.manifest.get('restricted'))


def candidate_dirs(assets_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    found = []
    if assets_dir:
        found.append(('--assets-dir', Path(assets_dir)))
    if os.environ.get('CEREBSEG_ASSETS'):
        found.append(('CEREBSEG_ASSETS', Path(os.environ['CEREBSEG_ASSETS'])))
    found.append(('user cache', user_cache_dir()))
    return found


def load_assets(assets_dir: str | os.PathLike | None = None, verify: bool = True) -> Assets:
    """The first assets folder that exists in the search order, checked against its manifest.

    A folder named explicitly (``--assets-dir`` or ``CEREBSEG_ASSETS``) is used or refused,
    never skipped. Raises :class:`MissingAssetError` (exit 126) naming what is wrong.
    """
    for origin, root in candidate_dirs(assets_dir):
        if not (root / MANIFEST).is_file():
            if origin == 'user cache':
                continue
            raise MissingAssetError(f'No cerebseg assets in {root} (from {origin}): '
                                    f'{MANIFEST} is missing. {BUILD_HINT}')
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise MissingAssetError(f'Corrupt {root / MANIFEST}: {err}. {BUILD_HINT}') from err
        if manifest.get('format') != ASSETS_FORMAT:
            raise MissingAssetError(f'The assets in {root} have format {manifest.get("format")}, '
                                    f'this cerebseg needs {ASSETS_FORMAT}. {BUILD_HINT}')
        if verify:
            for rel, digest in manifest['files'].items():
                path = root / rel
                if not path.is_file():
                    raise MissingAssetError(f'Asset file missing: {path}. {BUILD_HINT}')
                if sha256sum(path) != digest:
                    raise MissingAssetError(f'Asset file corrupt (sha256 mismatch): {path}. '
                                            f'{BUILD_HINT}')
        return Assets(root=root.absolute(), manifest=manifest)
    raise MissingAssetError(f'No cerebseg assets found (looked in {user_cache_dir()}). '
                            f'{BUILD_HINT}')
