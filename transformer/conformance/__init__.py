"""The attention conformance suite: does a kernel compute what torch's SDPA computes?

Point it at any function with the signature of
``torch.nn.functional.scaled_dot_product_attention``::

    transformer conform my_package.my_module:my_attention --report out/
    pytest --attention-kernel my_package.my_module:my_attention

or from Python::

    from transformer.conformance import Settings, run
    report = run(my_attention, Settings(tier="quick"))

Each property (:data:`PROPERTIES`) is one sentence checked on many cases against a
float64 reference written plainly (:mod:`~transformer.conformance.reference`), by
FlashAttention's accuracy rule (:mod:`~transformer.conformance.compare`). Properties
fall in four sections: *core* (torch's documented semantics), *memory* (no ``L x S``
matrix), *extensions* (what this package's kernels add) and *errors* (bad input).

Modules: ``case`` (one call's inputs), ``reference``, ``compare``, ``registry``,
``checks``, the properties (``core``, ``dropout``, ``dropout_values``, ``extra``), ``memory``,
``runner``, ``report``, ``plugin`` (pytest), ``cli`` and ``adapters`` (torch's own
kernels, pinned, as targets).
"""

from __future__ import annotations

from transformer.conformance import (  # noqa: F401 - registers properties
    core,
    dropout,
    dropout_values,
    extra,
)
from transformer.conformance.case import DTYPES, Case, Failure, Settings, Unsupported
from transformer.conformance.registry import PROPERTIES, SECTIONS, Property
from transformer.conformance.runner import Report, load_kernel, run, run_case

__all__ = [
    "DTYPES",
    "PROPERTIES",
    "SECTIONS",
    "Case",
    "Failure",
    "Property",
    "Report",
    "Settings",
    "Unsupported",
    "load_kernel",
    "run",
    "run_case",
]
