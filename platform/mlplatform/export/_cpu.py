"""CPU instruction sets that decide INT8 speed, read from /proc/cpuinfo (Linux)."""

from __future__ import annotations

import os

from mlplatform.export._report import CpuFeatures


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> CpuFeatures:
    """AVX2 / AVX-512 / VNNI / AMX flags and the CPU model of this machine (all False where unknown)."""
    flags: set[str] = set()
    model = "unknown CPU"
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "model name" and model == "unknown CPU":
                    model = value.strip()
    except OSError:
        pass  # not Linux: report the sets as absent rather than guess
    return CpuFeatures(
        model=model,
        logical_cpus=os.cpu_count() or 0,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        vnni=bool({"avx512_vnni", "avx_vnni"} & flags),
        amx="amx_int8" in flags,
    )
