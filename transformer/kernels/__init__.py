"""Scratch attention kernels; importing this package registers them.

``chunked`` (online softmax over key/query blocks, CPU and CUDA) and ``triton``
(FlashAttention in Triton; imports triton only when first called).
"""

from __future__ import annotations

import importlib.util

# Modules are imported only when present so a partial checkout still imports.
for _name in ("chunked", "triton_flash"):
    if importlib.util.find_spec(f"transformer.kernels.{_name}") is not None:
        importlib.import_module(f"transformer.kernels.{_name}")
