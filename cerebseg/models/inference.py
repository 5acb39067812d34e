"""Device selection: the only module that names CUDA."""
from __future__ import annotations

import logging

LOGGER = logging.getLogger('cerebseg.models.inference')


def resolve_device(name: str = 'auto'):
    """``'auto'`` -> CUDA when available else CPU; ``'cpu'``; ``'cuda'`` or ``'cuda:N'``.

    Raises ``ValueError`` when CUDA is asked for and not available, naming the fix.
    """
    import torch

    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cpu':
        return torch.device('cpu')
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ValueError(f'--device {name} was requested but no CUDA device is available '
                             '(this torch build or this machine has none); use --device cpu '
                             'or --device auto.')
        return torch.device(name)
    raise ValueError(f'Unknown device {name!r}; use auto, cpu or cuda[:N].')
