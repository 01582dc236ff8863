"""Run the properties against one kernel and collect what happened, case by case.

:func:`run` is the whole suite as a function: ``run(kernel, Settings(...))`` returns a
:class:`Report`. The command line (``transformer conform``) and the pytest plugin both
call :func:`run_case`, so a case means the same thing under either.

Statuses: a case PASSes, FAILs (:class:`~transformer.conformance.case.Failure`: the
kernel broke the property, or raised something other than a refusal), is UNSUPPORTED
(the kernel refused the feature) or "PASS (forward only)" (right output, backward refused). A property FAILs when any case fails, PASSes when
none fails and some pass, and is UNSUPPORTED when every case was refused. In the errors
section a failure is shown as SILENT: the kernel answered bad input instead of refusing.
"""

from __future__ import annotations

import importlib
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import torch

from transformer.conformance.case import (
    BackwardUnsupported,
    Case,
    Failure,
    FollowsFromAnother,
    Kernel,
    Settings,
    Unsupported,
)
from transformer.conformance.registry import PROPERTIES, SECTIONS, Property

__all__ = ["CaseResult", "PropertyResult", "Report", "load_kernel", "run", "run_case"]

PASS, FAIL, UNSUPPORTED, SILENT = "PASS", "FAIL", "UNSUPPORTED", "SILENT"
#: Every case that ran had a right forward and a refused backward.
FORWARD_ONLY = "PASS (forward only)"
#: Sections whose failures make the exit status non-zero (``--strict`` adds the others).
COUNTED = ("core", "memory")


@dataclass(frozen=True)
class CaseResult:
    """What one case gave: status, the failure's or refusal's text, a note, seconds."""

    case: Case
    status: str
    detail: str
    seconds: float
    #: A failure another property explains better (:class:`FollowsFromAnother`).
    follows: bool = False


@dataclass
class PropertyResult:
    """Every case of one property."""

    prop: Property
    results: list[CaseResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def status(self) -> str:
        """FAIL (SILENT in the errors section) if any case failed, else PASS if any passed."""
        if self.count(FAIL):
            return SILENT if self.prop.section == "errors" else FAIL
        if self.count(PASS):
            return PASS
        if self.count(FORWARD_ONLY):
            return FORWARD_ONLY
        return UNSUPPORTED if self.results else "NOT RUN"

    def first(self, status: str) -> CaseResult | None:
        return next((r for r in self.results if r.status == status), None)

    @property
    def follows(self) -> bool:
        """Does every failing case say that another property explains it better?"""
        failing = [r for r in self.results if r.status == FAIL]
        return bool(failing) and all(r.follows for r in failing)


@dataclass
class Report:
    """A run's results, property by property, with what was run and where."""

    target: str
    settings: Settings
    properties: list[PropertyResult]
    seconds: float
    torch_version: str = torch.__version__
    #: Set when the run was interrupted (Ctrl-C): the property and case that were running.
    interrupted: str | None = None

    def in_section(self, section: str) -> list[PropertyResult]:
        return [p for p in self.properties if p.prop.section == section]

    def failures(self) -> list[PropertyResult]:
        """FAILing properties, the most fundamental first (the likely root cause leads).

        SILENT (errors section) is not a failure of semantics and is listed apart.
        """
        failing = (p for p in self.properties if p.status == FAIL)
        return sorted(failing, key=lambda p: (p.follows, p.prop.rank))

    def silent(self) -> list[PropertyResult]:
        """Errors-section properties where the kernel answered bad input."""
        return [p for p in self.properties if p.status == SILENT]

    def exit_code(self, strict: bool = False) -> int:
        """1 when a core or memory property FAILs; ``strict`` also fails on any FAIL or UNSUPPORTED."""
        for p in self.properties:
            if p.status == FAIL and (strict or p.prop.section in COUNTED):
                return 1
            if strict and p.status in (UNSUPPORTED, FORWARD_ONLY):
                return 1
        return 0


def case_seed(prop: Property, case: Case) -> int:
    """The ``torch.manual_seed`` a case runs under: from the property's name and the case."""
    return zlib.crc32(f"{prop.name}:{case.id}:{case.seed}".encode())


def run_case(prop: Property, kernel: Kernel, case: Case, device: str) -> CaseResult:
    """Check one case; never raises for what the kernel does (it is recorded instead).

    The case runs under its own seed (:func:`case_seed`) in a fork of torch's random
    state: a kernel's random draws (dropout) are the same whichever cases ran before it,
    alone, in a full run or under pytest, so a result reproduces; the caller's random
    state is as it was.
    """
    start = time.perf_counter()
    seed = case_seed(prop, case)
    # A CPU run seeds (and restores) the CPU generator alone, leaving every GPU's as it
    # was; a CUDA run seeds and restores them all, as torch.manual_seed reaches them all.
    gpus = list(range(torch.cuda.device_count())) if device == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        if device == "cuda":
            torch.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        status, detail, follows = _checked(prop, kernel, case, device)
    return CaseResult(case, status, detail, time.perf_counter() - start, follows)


def _checked(prop: Property, kernel: Kernel, case: Case, device: str) -> tuple[str, str, bool]:
    """``(status, detail, follows)`` of one case: :func:`run_case` without the timing and seed."""
    follows = False
    try:
        note = prop.check(kernel, case, device)
        status, detail = PASS, note or ""
    except Failure as failure:
        status, detail = FAIL, str(failure)
        follows = isinstance(failure, FollowsFromAnother)
    except BackwardUnsupported as refusal:
        status, detail = FORWARD_ONLY, str(refusal)
    except Unsupported as refusal:
        status, detail = UNSUPPORTED, str(refusal)
    except Exception as err:  # one broken case must not end the run
        # What the kernel returned broke the check itself (an object no check expected):
        # recorded as a failure, so the other cases still run and the report is written.
        text = str(err).strip().splitlines()
        status = FAIL
        detail = (
            f"judging the kernel's result raised {type(err).__name__}: "
            f"{text[0][:300] if text else '(no message)'}\n    case: {case.describe()}"
        )
    finally:
        # A failed case may leave a CUDA error or a pending allocation behind.
        if device == "cuda":
            torch.cuda.synchronize()
    return status, detail, follows


def selected(names: Iterable[str] | None = None) -> list[Property]:
    """The properties to run, in report order (by section, then rank)."""
    chosen = list(PROPERTIES.values()) if names is None else [PROPERTIES[n] for n in names]
    order = list(SECTIONS)
    return sorted(chosen, key=lambda p: (order.index(p.section), p.rank))


def run(
    kernel: Kernel,
    settings: Settings,
    *,
    target: str = "",
    properties: Iterable[str] | None = None,
    progress: Callable[[PropertyResult], None] | None = None,
) -> Report:
    """Run every selected property's cases against ``kernel``; ``progress`` sees each property's result.

    A ``KeyboardInterrupt`` (Ctrl-C, e.g. on a kernel that hangs) ends the run early:
    the report holds the properties finished before it (not the one that was running:
    its verdict would rest on part of its cases), and ``interrupted`` names the property
    and case that were running.
    """
    start = time.perf_counter()
    results = []
    interrupted = None
    for prop in selected(properties):
        result = PropertyResult(prop)
        running = f"{prop.name} (building its cases)"
        try:
            for case in prop.cases(settings):
                running = f"{prop.name} on case {case.describe()}"
                result.results.append(run_case(prop, kernel, case, settings.device))
        except KeyboardInterrupt:
            interrupted = running
            break
        results.append(result)
        if progress is not None:
            progress(result)
    return Report(target, settings, results, time.perf_counter() - start, interrupted=interrupted)


def load_kernel(spec: str) -> Kernel:
    """The function named by ``package.module:function`` (``ValueError`` if it cannot be loaded)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"kernel must be given as package.module:function, got {spec!r}")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, TypeError) as err:
        # TypeError: a relative module name (".mine"), which import_module refuses so.
        raise ValueError(f"kernel {spec!r} cannot be loaded: {err}") from err
    if not callable(obj):
        raise ValueError(f"kernel {spec!r} is a {type(obj).__name__}, not a function")
    return cast(Kernel, obj)
