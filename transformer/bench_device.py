"""The machine a benchmark runs on: its name, its free memory, its GPU's peak TFLOP/s.

Also :func:`_sync`, which waits for the device, so that a timer stops after the work.
"""

from __future__ import annotations

import platform

import torch

#: Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s from the vendors' data
#: sheets, matched in order (first match wins) against ``torch.cuda.get_device_name()``.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
]


def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of the GPU called ``name``, or ``None`` when it is not in the table."""
    for pattern, peak in PEAK_BF16_TFLOPS:
        if pattern.lower() in name.lower():
            return peak
    return None


def _free_memory(device: str) -> int:
    # CUDA only (here, in _sync and _hardware, and in bench_memory's _peak_memory and
    # _memory_note): the default suite runs on the CPU;
    # spec_tests/test_bench.py::test_bench_on_cuda_* runs these on a GPU.
    if device == "cuda":  # pragma: no cover
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 << 30


def _hardware(device: str) -> str:
    if device == "cuda":  # pragma: no cover  (CUDA only, see _free_memory)
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector instruction set of torch's CPU kernels here: ``"AVX512"``, ``"AVX2"``...

    A report names it because the same CPU model name can come with either (a virtual
    machine may hide AVX-512), and the speed of every CPU row depends on it.
    """
    return str(torch.backends.cpu.get_cpu_capability())


def _sync(device: str) -> None:
    if device == "cuda":  # pragma: no cover  (CUDA only, see _free_memory)
        torch.cuda.synchronize()
