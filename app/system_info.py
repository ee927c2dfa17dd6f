"""The machine a benchmark ran on, recorded with every run so that figures compare across machines and over time.

Read without importing any engine (torch, mlx, llama_cpp): the CPU and OS from the operating system's own files and
commands, library versions from their installed metadata. Where a GPU is, the bench's child processes say (their
backend's device_summary, which may import the engine: see gpu_named_in).
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

# The distributions whose versions decide a benchmark's figures, in the order a reader looks for them.
LIBRARIES = ("pocketlm", "llama-cpp-python", "torch", "transformers", "mlx", "mlx-lm", "gptqmodel")
# Words in a backend's device_summary that name a GPU it runs on (llama.cpp's "GPU offload supported" does not: it
# says what the build could do, not that there is a GPU).
_GPU_SUMMARY = re.compile(r"\b(CUDA|ROCm|Metal GPU|Vulkan|XPU)\b")


@dataclass(frozen=True)
class SystemInfo:
    machine: str  # "x86_64", "arm64"
    os: str  # "Linux 6.1.0 (Debian GNU/Linux 12 (bookworm))", "macOS 15.1"
    cpu: str  # "AMD EPYC 7B13", "Apple M2"
    physical_cores: int
    logical_cores: int
    memory_bytes: int
    gpu: str  # "" when none was seen
    libraries: tuple[tuple[str, str], ...]  # (distribution, version), installed ones only

    def to_dict(self) -> dict[str, object]:
        return {"machine": self.machine, "os": self.os, "cpu": self.cpu, "physical_cores": self.physical_cores,
                "logical_cores": self.logical_cores, "memory_bytes": self.memory_bytes, "gpu": self.gpu,
                "libraries": [list(pair) for pair in self.libraries]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SystemInfo:
        libraries = data.get("libraries") or []
        return cls(machine=str(data.get("machine", "")), os=str(data.get("os", "")), cpu=str(data.get("cpu", "")),
                   physical_cores=int(data.get("physical_cores", 0)),  # type: ignore[call-overload]
                   logical_cores=int(data.get("logical_cores", 0)),  # type: ignore[call-overload]
                   memory_bytes=int(data.get("memory_bytes", 0)),  # type: ignore[call-overload]
                   gpu=str(data.get("gpu", "")),
                   libraries=tuple((str(name), str(number)) for name, number in libraries))  # type: ignore[union-attr]  # fmt: skip

    def with_gpu(self, gpu: str) -> SystemInfo:
        return replace(self, gpu=gpu)

    def summary(self) -> str:
        """One line for a report: CPU, cores, memory, GPU, then the library versions."""
        memory = f"{self.memory_bytes / 2**30:.0f} GiB RAM"
        cores = f"{self.physical_cores} cores / {self.logical_cores} threads"
        hardware = ", ".join(filter(None, [self.cpu or self.machine, cores, memory, self.gpu or "no GPU", self.os]))
        libraries = ", ".join(f"{name} {number}" for name, number in self.libraries)
        return f"{hardware}; {libraries}" if libraries else hardware


def collect_system_info() -> SystemInfo:
    """This machine, as far as it can be read without importing an engine (the GPU is left to gpu_named_in)."""
    return SystemInfo(
        machine=platform.machine(), os=_os_name(), cpu=_cpu_name(),
        physical_cores=psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        logical_cores=psutil.cpu_count() or 1, memory_bytes=int(psutil.virtual_memory().total),
        gpu=_nvidia_gpu(), libraries=installed_libraries(),
    )  # fmt: skip


def installed_libraries() -> tuple[tuple[str, str], ...]:
    found = []
    for name in LIBRARIES:
        try:
            found.append((name, version(name)))
        except PackageNotFoundError:
            continue
    return tuple(found)


def gpu_named_in(device_summaries: list[str]) -> str:
    """The first backend device summary that names a GPU ("CUDA: NVIDIA H200, 139.8 GiB"), else ""."""
    return next((summary for summary in device_summaries if _GPU_SUMMARY.search(summary)), "")


def _os_name() -> str:
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}".strip()
    if sys.platform.startswith("linux"):
        try:
            pretty = platform.freedesktop_os_release().get("PRETTY_NAME", "")
        except OSError:
            pretty = ""
        return f"Linux {platform.release()}" + (f" ({pretty})" if pretty else "")
    return f"{platform.system()} {platform.release()}".strip()


def _cpu_name() -> str:
    if sys.platform.startswith("linux"):
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            text = ""
        # x86 says "model name"; arm64 kernels often say nothing but a "CPU part" number, which names nobody.
        if match := re.search(r"^(?:model name|Model|Hardware)\s*:\s*(.+)$", text, re.MULTILINE):
            return " ".join(match[1].split())
    if sys.platform == "darwin":
        try:
            answer = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if answer.returncode == 0 and answer.stdout.strip():
                return answer.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _nvidia_gpu() -> str:
    """NVIDIA's driver names its GPUs under /proc on Linux: read without CUDA, torch or nvidia-smi."""
    names = []
    for information in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            match = re.search(r"^Model:\s*(.+)$", information.read_text(errors="replace"), re.MULTILINE)
        except OSError:
            continue
        if match:
            names.append(match[1].strip())
    return ", ".join(names)
