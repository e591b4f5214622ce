"""Kernel tests run twice: on CPU through Triton's interpreter (default run, tiny shapes) and on CUDA (-m gpu).

Without CUDA, TRITON_INTERPRET=1 is set here, before any kernel module is imported, so the kernels run on
CPU tensors. With CUDA the kernels are compiled and the interpreter cases skip.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(
    params=[pytest.param("cpu", id="interpret"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
)
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 is off (a GPU is present): the kernels are tested with -m gpu")
    return torch.device(request.param)
