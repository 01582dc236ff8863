"""Fixtures of the spec suite.

The attention conformance suite is parametrized over ``(kernel, device)``: every
registered kernel on every device where it is available. ``--attention-kernel
package.module:function`` replaces that list with one outside function of the SPEC
signature, so a user can run the very same suite against their own kernel.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from transformer.attention import available_kernels, register_kernel

EXTERNAL_KERNEL_NAME = "external"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--attention-kernel",
        default=None,
        metavar="PACKAGE.MODULE:FUNCTION",
        help="run the attention conformance suite against this function instead of the "
        "registered kernels (same signature as torch's scaled_dot_product_attention)",
    )


def _load_external(spec: str) -> None:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise pytest.UsageError(f"--attention-kernel expects package.module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise pytest.UsageError(f"--attention-kernel {spec!r} cannot be loaded: {err}") from err
    register_kernel(EXTERNAL_KERNEL_NAME, fn)


def devices() -> list[str]:
    """Devices the suite runs on here: CPU always, CUDA when present."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def kernel_params(config: pytest.Config) -> list[object]:
    """``pytest.param((kernel, device))`` for every kernel usable on every device."""
    external = config.getoption("--attention-kernel")
    params: list[object] = []
    for device in devices():
        names = [EXTERNAL_KERNEL_NAME] if external else available_kernels(device)
        for name in names:
            marks = [pytest.mark.triton] if name == "triton" else []
            if device == "cuda":
                marks.append(pytest.mark.cuda)
            params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


def pytest_configure(config: pytest.Config) -> None:
    external = config.getoption("--attention-kernel")
    if external:
        _load_external(external)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kernel_device" in metafunc.fixturenames:
        metafunc.parametrize("kernel_device", kernel_params(metafunc.config))


@pytest.fixture
def kernel(kernel_device: tuple[str, str]) -> str:
    """Name of the attention kernel under test."""
    return kernel_device[0]


@pytest.fixture
def device(kernel_device: tuple[str, str]) -> torch.device:
    """Device the kernel under test runs on."""
    return torch.device(kernel_device[1])
