"""The working grid: a box around cerebellum and brainstem in MNI152NLin2009cAsym space.

DeepCeres works on a 0.5 mm box of 252 x 156 x 162 voxels. cerebseg keeps the 0.5 mm spacing, the
x extent (126 mm) and the z extent (81 mm) but makes the box 90 mm deep (y from -104 to -14 mm):
in MNI152NLin2009cAsym the SUIT atlas spans y = -95 .. -29 mm and the pons reaches y = -15 mm,
so the paper's 78 mm would clip either the posterior cerebellum or the brainstem of larger heads.
The box is axis-aligned with the template (RAS), and its first voxel centre is at ``origin``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BoxGrid:
    """An axis-aligned RAS box: ``origin`` is the centre (mm) of voxel (0, 0, 0)."""

    origin: tuple[float, float, float]
    extent: tuple[float, float, float]
    spacing: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(round(e / self.spacing)) for e in self.extent)

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([self.spacing] * 3 + [1.0])
        affine[:3, 3] = self.origin
        return affine

    def at(self, spacing: float) -> 'BoxGrid':
        """The same box (same physical extent) at another spacing."""
        shift = (spacing - self.spacing) / 2.0
        return BoxGrid(origin=tuple(o + shift for o in self.origin), extent=self.extent,
                       spacing=spacing)

    def reference(self, spacing: float | None = None):
        """An empty ANTsImage on this grid (or on the same box at ``spacing``)."""
        import nibabel as nib

        from cerebseg.utils.images import nib_to_ants

        grid = self if spacing is None else self.at(spacing)
        return nib_to_ants(nib.Nifti1Image(np.zeros(grid.shape, np.float32), grid.affine))

    def to_dict(self) -> dict:
        return {'origin': list(self.origin), 'extent': list(self.extent),
                'spacing': self.spacing, 'shape': list(self.shape),
                'space': 'MNI152NLin2009cAsym'}

    @classmethod
    def from_dict(cls, dct: dict) -> 'BoxGrid':
        return cls(origin=tuple(dct['origin']), extent=tuple(dct['extent']),
                   spacing=float(dct['spacing']))


#: x in [-63, 63), y in [-104, -14), z in [-75, 6) mm; 252 x 180 x 162 voxels at 0.5 mm
WORKING_GRID = BoxGrid(origin=(-62.75, -103.75, -74.75), extent=(126.0, 90.0, 81.0), spacing=0.5)

#: the brainstem box (1 mm, MNI152NLin2009cAsym): x in [-32, 32], y in [-62, 7], z in [-80, 10] mm
#: (voxel centres; 65 x 70 x 91 voxels), symmetric about x = 0 with a voxel on the midline. The
#: brainstem label set spans x -22..23, y -52..-8, z -72..0 mm there (the Brainstem Navigator
#: nuclei reach y = -4 mm in MNI152NLin6Asym): at least 8 mm of margin on every side. The 2009c
#: template starts at z = -78 mm, so the two lowest slices of its T1 are empty.
BRAINSTEM_GRID = BoxGrid(origin=(-32.0, -62.0, -80.0), extent=(65.0, 70.0, 91.0), spacing=1.0)
