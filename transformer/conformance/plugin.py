"""The conformance suite under pytest: one test item per (kernel, property, case).

Registered through the ``pytest11`` entry point ``transformer_conformance``, it does
nothing unless asked: ``pytest --attention-kernel package.module:function`` adds the
suite to the run (in any folder, no checkout needed), and a test module can hold the
suite by assigning ``test_attention_conformance = ConformanceSuite(kernels)``, as the
project's own ``spec_tests/`` does for its kernels.

Each item runs :func:`~transformer.conformance.runner.run_case`, the very function the
``transformer conform`` command runs: a FAIL fails the test with the property's sentence,
the case and the worst element; an UNSUPPORTED case is skipped with the kernel's refusal
as the reason; a SILENT answer to bad input is an xfail for an outside kernel (the
errors section is informational) and a failure where the suite says ``strict_errors``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from transformer.conformance.case import DTYPES, Case, Kernel, Settings
from transformer.conformance.registry import Property
from transformer.conformance.runner import (
    FAIL,
    FORWARD_ONLY,
    UNSUPPORTED,
    load_kernel,
    run_case,
    selected,
)

__all__ = ["ConformanceSuite", "KernelUnderTest"]

_KERNEL_KEY = pytest.StashKey["KernelUnderTest"]()
_SUITE_FILE = Path(__file__).with_name("pytest_suite.py")


@dataclass(frozen=True)
class KernelUnderTest:
    """A kernel, the name its items carry, the device it runs on and pytest marks for them.

    ``not_promised`` maps a property the kernel does not claim to the reason; its items
    are strict xfails, so they fail the run the day the kernel starts to pass them.
    ``memory_length`` overrides L = S of the memory cases (see ``Settings``), ``dtypes``
    the run's dtypes (short names, as ``--conformance-dtypes``).
    """

    name: str
    kernel: Kernel
    device: str = "cpu"
    marks: tuple[Any, ...] = ()
    not_promised: tuple[tuple[str, str], ...] = ()
    memory_length: int | None = None
    dtypes: tuple[str, ...] | None = None


class ConformanceSuite:
    """Assigned to a ``test_*`` name in a test module, it collects the suite there.

    ``kernels`` is a list of :class:`KernelUnderTest` or a function of the pytest config
    returning one (so the list is built at collection time). ``spec_component`` tags each
    item with the project's ``spec`` mark for the specification document. With
    ``strict_errors`` a kernel that answers bad input (errors section) fails; without, as
    for outside kernels, that informational finding is reported as an xfail.
    """

    def __init__(
        self,
        kernels: Sequence[KernelUnderTest] | Callable[[pytest.Config], Sequence[KernelUnderTest]],
        *,
        spec_component: str | None = None,
        strict_errors: bool = False,
    ) -> None:
        self.kernels = kernels
        self.spec_component = spec_component
        self.strict_errors = strict_errors

    def kernels_for(self, config: pytest.Config) -> Sequence[KernelUnderTest]:
        return self.kernels(config) if callable(self.kernels) else self.kernels


class ConformanceFailure(AssertionError):
    """A conformance case failed; its message is the property, the case and the numbers."""


class ConformanceItem(pytest.Item):
    """One case of one property on one kernel."""

    def __init__(
        self,
        *,
        prop: Property,
        case: Case,
        target: KernelUnderTest,
        strict_errors: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prop, self.case, self.target = prop, case, target
        self.strict_errors = strict_errors
        # What the specification recorder reads: the statement and the grouping of cases.
        self.function = prop.check
        self.originalname = f"test_{prop.name.replace('-', '_')}"

    def runtest(self) -> None:
        result = run_case(self.prop, self.target.kernel, self.case, self.target.device)
        if result.status == FAIL and self.prop.section == "errors" and not self.strict_errors:
            pytest.xfail(f"SILENT (informational): {result.detail}")
        if result.status == FAIL:
            raise ConformanceFailure(f"{self.prop.statement}\n{result.detail}")
        if result.status in (UNSUPPORTED, FORWARD_ONLY):
            pytest.skip(f"{result.status}: {result.detail}")

    def repr_failure(self, excinfo: Any, style: Any = None) -> Any:
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        code = self.prop.check.__code__
        return Path(code.co_filename), code.co_firstlineno - 1, f"{self.prop.name}: {self.case.id}"


class ConformanceCollector(pytest.Collector):
    """Every item of a :class:`ConformanceSuite`."""

    def __init__(self, *, suite: ConformanceSuite, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.suite = suite

    def collect(self) -> Iterator[pytest.Item]:
        config = self.config
        tier = config.getoption("--conformance-tier")
        names = config.getoption("--conformance-dtypes") or ["fp32", "bf16"]
        dtypes = tuple(DTYPES[n] for n in names)
        for target in self.suite.kernels_for(config):
            chosen = dtypes if target.dtypes is None else tuple(DTYPES[n] for n in target.dtypes)
            settings = Settings(tier, chosen, target.device)
            if target.memory_length is not None:
                settings = dataclasses.replace(settings, memory_length=target.memory_length)
            for prop in selected():
                for case in prop.cases(settings):
                    item = ConformanceItem.from_parent(
                        self,
                        name=f"{prop.name}[{target.name}-{target.device}-{case.id}]",
                        prop=prop,
                        case=case,
                        target=target,
                        strict_errors=self.suite.strict_errors,
                    )
                    for mark in target.marks:
                        item.add_marker(mark)
                    for name, reason in target.not_promised:
                        if name == prop.name:
                            item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
                    if self.suite.spec_component is not None:
                        section = "torch" if prop.section == "core" else "extra"
                        item.add_marker(
                            pytest.mark.spec(
                                component=self.suite.spec_component, section=section, kind=prop.kind
                            )
                        )
                    yield item


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "attention conformance", "attention kernel conformance (transformer-spec)"
    )
    group.addoption(
        "--attention-kernel",
        default=None,
        metavar="PACKAGE.MODULE:FUNCTION",
        help="run the attention conformance suite against this function (torch SDPA's signature)",
    )
    group.addoption(
        "--conformance-tier",
        default="quick",
        choices=["quick", "full", "thorough"],
        help="sizes of the conformance cases (default quick)",
    )
    group.addoption(
        "--conformance-dtypes",
        nargs="+",
        default=None,
        choices=list(DTYPES),
        help="dtypes of the conformance cases (default fp32 bf16)",
    )
    group.addoption(
        "--conformance-device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="device of the outside kernel's cases (default cpu)",
    )
    group.addoption(
        "--conformance-memory-length",
        type=int,
        default=None,
        metavar="N",
        help="L = S of the memory cases: above your kernel's largest fixed tile (default 2048)",
    )


def pytest_configure(config: pytest.Config) -> None:
    spec = config.getoption("--attention-kernel")
    if not spec:
        return
    # As `transformer conform` and `python -m pytest` do: a module in the folder pytest
    # was started from is importable.
    here = str(config.invocation_params.dir)
    if here not in sys.path:
        sys.path.insert(0, here)
    device = config.getoption("--conformance-device")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--conformance-device cuda: torch sees no CUDA device here")
    length = config.getoption("--conformance-memory-length")
    if length is not None and length < 1:
        raise pytest.UsageError(
            f"--conformance-memory-length must be a positive length, got {length}"
        )
    try:
        kernel = load_kernel(spec)
    except ValueError as err:
        raise pytest.UsageError(f"--attention-kernel: {err}") from None
    config.stash[_KERNEL_KEY] = KernelUnderTest(spec, kernel, device, memory_length=length)
    config.args.append(str(_SUITE_FILE))


def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Any:
    if isinstance(obj, ConformanceSuite):
        return ConformanceCollector.from_parent(collector, name=name, suite=obj)
    return None


def outside_kernel(config: pytest.Config) -> Sequence[KernelUnderTest]:
    """The kernel named by ``--attention-kernel`` (none when it was not given)."""
    target = config.stash.get(_KERNEL_KEY, None)
    return [target] if target is not None else []
