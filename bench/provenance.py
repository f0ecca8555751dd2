"""Where and from what a benchmark ran: the git commit and the device's name, for the results' JSON."""

from __future__ import annotations

import platform
import subprocess

import torch


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def device_name(device: str | None) -> str:
    """The GPU's name on CUDA, else the processor's."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()
