"""DerivativesDataSink: the one place where derivatives get their BIDS names (atomic writes)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from nipype.interfaces.base import BaseInterfaceInputSpec, File, TraitedSpec, traits

from cerebseg.interfaces.base import CerebsegInterface

#: entities kept from the source file, in BIDS order
SOURCE_ENTITIES = ('sub', 'ses', 'acq', 'ce', 'rec', 'run')
#: entities a derivative may add, in BIDS order (``seg`` before ``res``: the specification's
#: entity table; from/to/mode are the transforms' of BEP014, listed in .bidsignore)
DERIV_ENTITIES = ('from', 'to', 'mode', 'space', 'seg', 'res', 'desc')
#: the derivative datatype folders cerebseg writes (``figures``: report figures)
DATATYPES = ('anat', 'figures')


def source_entities(path: str) -> dict[str, str]:
    """The BIDS entities of a raw file name (``sub-01_ses-a_run-2_T1w.nii.gz``)."""
    name = Path(path).name
    found = dict(re.findall(r'(?:^|_)([a-zA-Z0-9]+)-([a-zA-Z0-9]+)(?=_)', name))
    if 'sub' not in found:
        raise ValueError(f'Not a BIDS file name (no sub- entity): {name}')
    return {k: found[k] for k in SOURCE_ENTITIES if k in found}


def file_entities(name: str) -> dict[str, str]:
    """Every ``key-value`` entity of a (derivative) file name."""
    return dict(re.findall(r'(?:^|_)([a-zA-Z]+)-([a-zA-Z0-9]+)', name))


def space_matches(name: str, space: str) -> bool:
    """Whether a file name has the entities of ``space``: its label, then any further
    entities (``MNI152NLin2009cAsym_res-05`` matches ``..._space-MNI152NLin2009cAsym_seg-
    cerebellum_res-05_dseg.nii.gz``, whatever the entity order)."""
    label, *extra = space.split('_')
    ents = file_entities(name)
    wanted = dict(e.split('-', 1) for e in extra if '-' in e)
    return ents.get('space') == label and all(ents.get(k) == v for k, v in wanted.items())


def derivative_path(base: str | os.PathLike, source_file: str, suffix: str, extension: str,
                    datatype: str = 'anat', **entities) -> Path:
    """``base/sub-X[/ses-Y]/anat/<source entities>_<entities>_<suffix><extension>``.

    ``datatype='figures'``: ``base/sub-X/figures/`` (every session's figures in one folder,
    as fMRIPrep's; the file names hold the session).
    """
    if datatype not in DATATYPES:
        raise ValueError(f'Unknown derivative datatype {datatype!r}; one of {DATATYPES}')
    src = source_entities(source_file)
    unknown = set(entities) - set(DERIV_ENTITIES)
    if unknown:
        raise ValueError(f'Unknown derivative entities {sorted(unknown)}')
    parts = [f'{k}-{v}' for k, v in src.items()]
    parts += [f'{k}-{entities[k]}' for k in DERIV_ENTITIES if entities.get(k)]
    folder = Path(base) / f"sub-{src['sub']}"
    if 'ses' in src and datatype != 'figures':
        folder = folder / f"ses-{src['ses']}"
    return folder / datatype / ('_'.join(parts + [suffix]) + extension)


class _SinkInputSpec(BaseInterfaceInputSpec):
    base_directory = traits.Str(mandatory=True, desc='output folder (derivatives root)')
    source_file = traits.Str(mandatory=True, desc='the raw file the derivative comes from')
    in_file = File(exists=True, mandatory=True, desc='file to store')
    suffix = traits.Str(mandatory=True, desc='BIDS suffix (dseg, xfm, morph, T1w, ...)')
    extension = traits.Str(mandatory=True, desc='file extension with the dot')
    entities = traits.Dict(traits.Str, traits.Str, usedefault=True, desc='derivative entities')
    meta = traits.Dict(usedefault=True, desc='JSON sidecar content (none if empty)')
    meta_files = traits.List(File(exists=True), usedefault=True,
                             desc='JSON files whose content is merged into the sidecar')
    meta_keys = traits.Dict(traits.Str, traits.Str, usedefault=True,
                            desc='if given, only these keys of meta_files are merged, renamed '
                                 '(key in the file -> key in the sidecar)')
    datatype = traits.Enum('anat', 'figures', usedefault=True, desc='derivative folder')


class _SinkOutputSpec(TraitedSpec):
    out_file = File(desc='where the derivative was written')
    out_meta = traits.Str(desc='the sidecar written (empty: none)')


class DerivativesDataSink(CerebsegInterface):
    """Copy ``in_file`` to its BIDS-derivatives name (temporary file + rename: never half-done)."""

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    always_run = True

    def _run_interface(self, runtime):
        from cerebseg.utils.images import atomic_copy, atomic_write_text

        out = derivative_path(self.inputs.base_directory, self.inputs.source_file,
                              self.inputs.suffix, self.inputs.extension,
                              datatype=self.inputs.datatype, **self.inputs.entities)
        if self.inputs.extension in ('.nii', '.nii.gz'):
            _copy_nifti(self.inputs.in_file, out)
        else:
            atomic_copy(self.inputs.in_file, out)
        self._results['out_file'] = str(out)
        self._results['out_meta'] = ''
        meta = dict(self.inputs.meta)
        keys = dict(self.inputs.meta_keys)
        for path in self.inputs.meta_files:
            with open(path) as fobj:
                found = json.load(fobj)
            if keys:
                found = {keys[k]: v for k, v in found.items() if k in keys}
            meta.update(found)
        if meta:
            sidecar = str(out)[: -len(self.inputs.extension)] + '.json'
            atomic_write_text(sidecar, json.dumps(meta, indent=2, sort_keys=True) + '\n')
            self._results['out_meta'] = sidecar
        return runtime


def _copy_nifti(src: str, dst: Path) -> None:
    """Copy a NIfTI, setting its spatial and time units to mm and s when unset (the BIDS
    validator's NIFTI_UNIT); the data and the affine are not touched."""
    import nibabel as nib

    from cerebseg.utils.images import atomic_copy, atomic_save

    img = nib.load(src)
    if img.header.get_xyzt_units() == ('mm', 'sec'):
        atomic_copy(src, dst)
        return
    img = img.__class__(img.dataobj, img.affine, img.header)
    img.header.set_xyzt_units('mm', 'sec')
    atomic_save(img, dst)
