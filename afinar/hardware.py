"""What machine are we on, and which preset fits it.

No framework import at module level: `detect()` imports torch lazily, only to ask about
CUDA/MPS, so config and data commands stay fast.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda", "mps" or "cpu"
    name: str
    memory_gb: float  # GPU memory on CUDA, unified/system memory otherwise
    cpu_count: int

    def describe(self) -> str:
        return f"{self.device} ({self.name}, {self.memory_gb:.0f} GB)"


def system_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def available_memory_gb() -> float:
    """Memory the OS can still give this process (MemAvailable on Linux; total elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return system_memory_gb()


def detect() -> Hardware:
    cpus = os.cpu_count() or 1
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return Hardware("cuda", props.name, props.total_memory / 2**30, cpus)
        if torch.backends.mps.is_available():
            return Hardware("mps", platform.processor() or "Apple Silicon", system_memory_gb(), cpus)
    except ImportError:
        pass
    return Hardware("cpu", cpu_name(), system_memory_gb(), cpus)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_preset(hw: Hardware) -> tuple[str, str]:
    """(preset name, reason) for `--preset auto`."""
    if hw.device == "cuda":
        if hw.memory_gb >= 70:
            return "cuda-80gb", f"CUDA GPU {hw.name} with {hw.memory_gb:.0f} GB (>= 70 GB)"
        return "cuda-24gb", f"CUDA GPU {hw.name} with {hw.memory_gb:.0f} GB (< 70 GB)"
    if hw.device == "mps":
        for limit, name in ((24, "mac-32gb"), (12, "mac-16gb")):
            if hw.memory_gb >= limit:
                return name, f"Apple Silicon with {hw.memory_gb:.0f} GB unified memory (>= {limit} GB)"
        return "mac-8gb", f"Apple Silicon with {hw.memory_gb:.0f} GB unified memory"
    return "cpu", f"no GPU found (CPU with {hw.cpu_count} cores, {hw.memory_gb:.0f} GB)"


def process_memory_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB: the CPU's 'device memory'.

    On Linux both come from /proc/self/status (VmRSS, VmHWM): the peak of this process's own memory.
    `getrusage`'s ru_maxrss is not used there because Linux carries it over from the parent across
    fork and exec: a process started by a large one (afinar compare's sub-processes, a test runner)
    would report the parent's size as its own peak.
    """
    import resource
    import sys

    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    fields[line.split(":")[0]] = int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    if len(fields) == 2:
        return fields["VmRSS"], max(fields["VmHWM"], fields["VmRSS"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
    return peak_mb, peak_mb
