"""What ran a measurement and from what: the machine in one line, the device, the git commit, for every report and
results file."""

from __future__ import annotations

import os
import platform
import subprocess

import torch


def processor_name() -> str:
    """The CPU's model name, with "with AMX" where it has the bfloat16 matrix unit (hosts with and without it
    round float sums differently, and so carve differently)."""
    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:
        pass
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return name + (" with AMX" if amx else "")


def machine(device=None) -> str:
    """The GPU's name where `device` is a CUDA device, else the processor's with the threads torch uses."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{processor_name()}, {torch.get_num_threads()} threads"


def device_name(device: str | None) -> str:
    """The GPU's name on CUDA, else the processor's."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return processor_name()


def git_commit() -> str:
    """HEAD's short hash, or $CMOE_GIT_COMMIT where the checkout travelled without its .git (a lent GPU)."""
    if os.environ.get("CMOE_GIT_COMMIT"):
        return os.environ["CMOE_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
