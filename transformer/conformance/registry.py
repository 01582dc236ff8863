"""The conformance properties: what each one states, where it comes from, how it is checked.

A :class:`Property` is one sentence a kernel must make true (its ``statement``), the
document it comes from (``source``: torch's SDPA documentation, the paper, FlashAttention),
its ``section`` and the cases it is checked on. ``rank`` orders properties from the most
fundamental (a wrong default scale breaks almost every case) to the most specific, so a
report lists the likely root cause first.

Sections of semantics:

* ``core``: exactly torch SDPA's documented behaviour; torch's own
  ``scaled_dot_product_attention`` passes all of it;
* ``extensions``: what this package's kernels add (a mask together with ``is_causal``,
  1-D masks, zeros for rows with no key); never counted against a kernel that
  implements torch's semantics only: any error it raises there means "not supported";
* ``memory``: FlashAttention's promise, no ``L x S`` matrix;
* ``errors``: what the kernel does with bad input; informational.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformer.conformance.case import Case, Kernel, Settings

__all__ = ["PROPERTIES", "SECTIONS", "Property", "conformance_property"]

#: Sections in report order, with their titles.
SECTIONS: dict[str, str] = {
    "core": "Core: torch SDPA's documented semantics",
    "memory": "Memory: no L x S matrix (FlashAttention's promise)",
    "extensions": "Extensions: what this package's kernels add (never counted against core)",
    "errors": "Errors: what the kernel does with bad input (informational)",
}

#: A check runs one case and returns an optional note for the report; it raises
#: :class:`~transformer.conformance.case.Failure` or ``Unsupported``.
Check = Callable[[Kernel, Case, str], "str | None"]


@dataclass(frozen=True)
class Property:
    """One property of attention, the cases it is checked on and its check."""

    name: str
    section: str
    rank: int
    statement: str
    source: str
    kind: str
    cases: Callable[[Settings], list[Case]]
    check: Check


#: Every property, by name, in the order they were defined.
PROPERTIES: dict[str, Property] = {}


def conformance_property(
    name: str,
    *,
    section: str,
    rank: int,
    source: str,
    kind: str,
    cases: Callable[[Settings], list[Case]],
) -> Callable[[Check], Check]:
    """Register the decorated check as property ``name``; its docstring's first line is the statement."""
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {list(SECTIONS)}, got {section!r}")

    def register(check: Check) -> Check:
        if name in PROPERTIES:
            raise ValueError(f"property {name!r} is defined twice")
        statement = (check.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        PROPERTIES[name] = Property(
            name, section, rank, " ".join(statement.split()), source, kind, cases, check
        )
        return check

    return register
