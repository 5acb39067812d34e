"""Templates and atlas libraries: building them from public sources, finding, checking them.

Layout of an assets folder (``manifest.json`` lists every file with its sha256)::

    manifest.json
    tpl-MNI152NLin2009cAsym_res-1_T1w.nii.gz              whole-head template (1 mm)
    tpl-MNI152NLin2009cAsym_res-1_desc-brain_T1w.nii.gz   brain-extracted template
    tpl-MNI152NLin2009cAsym_res-1_desc-brain_mask.nii.gz  its brain mask
    <library>/seg-cerebellum_dseg.tsv                     lookup table (index, name, ...)
    <library>/entry-<name>_T1w.nii.gz                     entry T1w on the working grid
    <library>/entry-<name>_T2w.nii.gz                     entry T2w (when the source has one)
    <library>/entry-<name>_dseg.nii.gz                    entry labels on the working grid
    brainstem/tpl-MNI152NLin2009cAsym_res-1_desc-brainstem_dseg.nii.gz  brainstem label set
    brainstem/tpl-MNI152NLin2009cAsym_res-1_desc-brainstem_T1w.nii.gz   2009c brain on its box
    brainstem/seg-brainstem_dseg.tsv                      its lookup table (+ part, source,
                                                          licence)

The ``brainstem`` section of the manifest is optional (``--no-brainstem``, or assets built before
it existed): code that needs it asks :meth:`cerebseg.assets.locate.Assets.brainstem`. When it
was built with a user's Brainstem Navigator folder, the manifest says ``"restricted": true``.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

MANIFEST = 'manifest.json'
ASSETS_FORMAT = 2
TEMPLATE_HEAD = 'tpl-MNI152NLin2009cAsym_res-1_T1w.nii.gz'
TEMPLATE_BRAIN = 'tpl-MNI152NLin2009cAsym_res-1_desc-brain_T1w.nii.gz'
TEMPLATE_MASK = 'tpl-MNI152NLin2009cAsym_res-1_desc-brain_mask.nii.gz'
LUT_NAME = 'seg-cerebellum_dseg.tsv'
#: the label protocol a run uses unless told (``--atlas-library``): CERES (cobra), chosen on the
#: real-anatomy benchmark (README, Accuracy: "The default protocol")
DEFAULT_LIBRARY = 'cobra'
#: the libraries ``cerebseg-assets build`` and ``fetch`` make unless told (``--library``): the
#: default and SUIT (its deep nuclei; ``--atlas-library suit``)
DEFAULT_BUILD = ('cobra', 'suit')
BRAINSTEM_DIR = 'brainstem'
BRAINSTEM_DSEG = 'tpl-MNI152NLin2009cAsym_res-1_desc-brainstem_dseg.nii.gz'
BRAINSTEM_T1W = 'tpl-MNI152NLin2009cAsym_res-1_desc-brainstem_T1w.nii.gz'
BRAINSTEM_LUT = 'seg-brainstem_dseg.tsv'


def package_json(name: str) -> dict:
    """A JSON file from ``cerebseg/data`` (e.g. ``protocols/suit.json``)."""
    return json.loads(resources.files('cerebseg').joinpath('data', name).read_text())


def protocol_setting(library: dict, key: str, default):
    """A setting of a library's label protocol (``cerebseg/data/protocols/NAME.json``, NAME the
    library's ``name``); ``default`` where the protocol or the key is missing."""
    try:
        return package_json(f'protocols/{library["name"]}.json').get(key, default)
    except FileNotFoundError:
        return default


def registration_control_mm(library: dict) -> float:
    """Control grid (mm) of the torch registration's velocity field for this library's protocol
    (its ``registration_control_mm``; 4 mm by default)."""
    return float(protocol_setting(library, 'registration_control_mm', 4.0))


def available_protocols() -> list[str]:
    """The atlas libraries (protocols with template entries; not the brainstem label set)."""
    folder = resources.files('cerebseg').joinpath('data', 'protocols')
    return sorted(p.name[:-5] for p in folder.iterdir()
                  if p.name.endswith('.json') and 'entries' in json.loads(p.read_text()))


def user_cache_dir() -> Path:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'cerebseg' / 'assets'
