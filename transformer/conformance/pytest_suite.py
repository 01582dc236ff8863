"""The module ``pytest --attention-kernel package.module:function`` collects the suite from."""

from __future__ import annotations

from transformer.conformance.plugin import ConformanceSuite, outside_kernel

test_attention_conformance = ConformanceSuite(outside_kernel)
