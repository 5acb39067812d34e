"""Download the public source files of the assets (``cerebseg-assets fetch``).

Used when building the container image or by users installing with pip; never at run time.
Each file is checked against the sha256 in ``cerebseg/data/sources.json``.
"""
from __future__ import annotations

import logging
import os
import tempfile
import urllib.request
from pathlib import Path

from cerebseg.assets import package_json
from cerebseg.errors import MissingAssetError
from cerebseg.utils.images import sha256sum

LOGGER = logging.getLogger('cerebseg.assets.fetch')


def fetch_sources(dest: str | Path, timeout: float = 120.0) -> Path:
    """Download every source file into ``dest`` (files already there and intact are kept)."""
    dest = Path(dest)
    for item in package_json('sources.json')['files']:
        target = dest / item['path']
        if target.is_file() and sha256sum(target) == item['sha256']:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        LOGGER.info('Downloading %s', item['url'])
        fd, tmp = tempfile.mkstemp(prefix='.download.', dir=target.parent)
        try:
            with os.fdopen(fd, 'wb') as fobj, \
                    urllib.request.urlopen(item['url'], timeout=timeout) as resp:  # noqa: S310
                while block := resp.read(1 << 20):
                    fobj.write(block)
            digest = sha256sum(tmp)
            if digest != item['sha256']:
                raise MissingAssetError(f'Checksum mismatch for {item["url"]}: got {digest}, '
                                        f'expected {item["sha256"]}.')
            os.replace(tmp, target)
        except OSError as err:
            raise MissingAssetError(f'Could not download {item["url"]}: {err}') from err
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest
