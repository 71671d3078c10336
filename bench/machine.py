"""What every benchmark prints beside its figures: the CPU's vector and matrix extensions (vLLM's and torch's CPU speed
depends on them, so a figure without them says little)."""

from __future__ import annotations

import platform

__all__ = ["cpu_flags"]


def cpu_flags() -> str:
    """The x86 flags that decide CPU kernel speed (avx2, avx512f, avx512_bf16, avx512_vnni, amx_tile) this machine has."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags)
