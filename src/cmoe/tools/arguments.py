"""The checks `cmoe`'s commands make of their arguments before any long work, each failing in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cmoe.errors import CMoEError
from cmoe.run_folder import check_writable_file


def at_least(flag: str, value, least) -> None:
    for item in value if isinstance(value, list) else [value]:
        if item is not None and item < least:
            raise CMoEError(f"{flag} must be at least {least}, got {item}.")


def checked_device(name: str | None) -> str | None:
    """The --device argument, checked: a device type PyTorch knows and this machine has."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CMoEError(f"--device {name!r} is no device PyTorch knows; use cpu or cuda (cuda:1 for a second GPU).") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CMoEError(f"--device {name} asks for a CUDA GPU, but PyTorch sees none on this machine; leave --device "
                            "out to run on the CPU.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CMoEError(f"--device {name} names GPU {device.index}, but this machine has {torch.cuda.device_count()}.")
    elif device.type != "cpu":
        raise CMoEError(f"--device {name}: cmoe runs on cpu or cuda only.")
    return name


def check_calibration_options(args) -> None:
    at_least("--calib-samples", args.calib_samples, 1)
    at_least("--calib-seqlen", args.calib_seqlen, 2)


def check_json(path: str | None) -> None:
    """--json FILE: fail before the work if FILE cannot be written."""
    if path is not None:
        check_writable_file(path, "--json")


def write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))


def needs_tokenizer(tokenizer, model: str, why: str) -> None:
    if tokenizer is None:
        raise CMoEError(f"{model} has no tokenizer that cmoe can load, so {why}.")
