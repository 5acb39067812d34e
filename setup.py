"""Build configuration for cerebseg's compiled extension only (metadata: pyproject.toml).

``cerebseg.kernels._wmv``: locally weighted majority voting in Cython with OpenMP (Linux:
``-fopenmp``; elsewhere it builds single-threaded). Typed memoryviews only: the build needs
neither NumPy nor torch. Set ``CEREBSEG_NO_EXT=1`` to skip it (the NumPy twin is then used).
"""
import os
import sys

from setuptools import Extension, setup


def _extensions():
    if os.environ.get('CEREBSEG_NO_EXT'):
        return []
    from Cython.Build import cythonize

    omp = ['-fopenmp'] if sys.platform.startswith('linux') else []
    ext = Extension('cerebseg.kernels._wmv', ['cerebseg/kernels/_wmv.pyx'],
                    extra_compile_args=['-O3'] + omp, extra_link_args=omp)
    return cythonize([ext], language_level=3)


setup(ext_modules=_extensions())
