"""common/devices.py: the one device rule of train, export, infer and the loaders."""

import pytest
import torch

from casm_deploy.common.devices import resolve_device
from casm_deploy.errors import UserError


def test_auto_is_cuda_where_there_is_one_and_the_cpu_elsewhere():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_naming_the_option():
    with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
        resolve_device("cuda")


def test_a_name_that_is_no_device_is_refused():
    with pytest.raises(UserError, match="not a device"):
        resolve_device("tpu")


@pytest.mark.gpu
def test_under_torchrun_bare_cuda_is_the_local_rank():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:0", local_rank=3) == torch.device("cuda", 0)
