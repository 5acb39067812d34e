"""cerebseg: cerebellar lobule and brainstem nuclei segmentation as a BIDS-App."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version('cerebseg')
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = '0.0.0+unknown'

__all__ = ['__version__']
