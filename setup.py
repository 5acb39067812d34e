"""Build configuration for cerebseg's compiled extensions only (metadata lives in pyproject.toml).

The Cython + OpenMP weighted-majority-voting kernel (issue 3) is added to ``EXTENSIONS`` here;
until then the package uses its NumPy implementation (``cerebseg.kernels.wmv``).
"""
from setuptools import setup

EXTENSIONS = []

setup(ext_modules=EXTENSIONS)
