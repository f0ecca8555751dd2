"""Where and from what a benchmark ran: the git commit and the device's name, for the results' JSON."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from cmoe.tools.provenance import processor_name


def git_commit() -> str:
    """HEAD's short hash, or $CMOE_GIT_COMMIT where the checkout travelled without its .git (a lent GPU)."""
    if os.environ.get("CMOE_GIT_COMMIT"):
        return os.environ["CMOE_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def device_name(device: str | None) -> str:
    """The GPU's name on CUDA, else the processor's (cmoe.tools.provenance)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return processor_name()
