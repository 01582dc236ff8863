"""Fixtures of the spec suite.

Tests that take the ``kernel`` and ``device`` fixtures run once per registered kernel on
every device where it is available, so a kernel registered later is held to the same bar
without a line changed. (An outside kernel is run through the conformance suite's pytest
plugin instead: ``pytest --attention-kernel package.module:function``.)
"""

from __future__ import annotations

import pytest
import torch

from transformer.attention import available_kernels


def devices() -> list[str]:
    """Devices the suite runs on here: CPU always, CUDA when present."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def kernel_params() -> list[object]:
    """``pytest.param((kernel, device))`` for every kernel usable on every device."""
    params: list[object] = []
    for device in devices():
        for name in available_kernels(device):
            marks = [pytest.mark.triton] if name == "triton" else []
            if device == "cuda":
                marks.append(pytest.mark.cuda)
            params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kernel_device" in metafunc.fixturenames:
        metafunc.parametrize("kernel_device", kernel_params())


@pytest.fixture
def kernel(kernel_device: tuple[str, str]) -> str:
    """Name of the attention kernel under test."""
    return kernel_device[0]


@pytest.fixture
def device(kernel_device: tuple[str, str]) -> torch.device:
    """Device the kernel under test runs on."""
    return torch.device(kernel_device[1])
