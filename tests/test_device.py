"""Device switch."""
import pytest
import torch

from cerebseg.models.inference import resolve_device


def test_cpu_and_auto():
    assert resolve_device('cpu') == torch.device('cpu')
    expected = 'cuda' if torch.cuda.is_available() else 'cpu'
    assert resolve_device('auto').type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match='--device cpu'):
        resolve_device('cuda')


def test_unknown_device():
    with pytest.raises(ValueError, match='Unknown device'):
        resolve_device('tpu')
