"""A fine-tune's checkpoint in `OUT_FT.partial/`: the trainable tensors, the selection biases, the optimiser and the
loop's state, written atomically after each step so that `--resume` goes on from the last one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cmoe.errors import CMoEError
from cmoe.run_folder import write_atomically

CHECKPOINT = "checkpoint.pt"


def trainable_state(model, state: dict | None = None) -> dict:
    """Get (or, given `state`, set) the trainable tensors and the selection biases."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers() if n.endswith("selection_bias")}
    if state is None:
        return {n: t.detach().clone() for n, t in model.state_dict().items() if n in names}
    missing = names - set(state)
    if missing:
        raise CMoEError(f"The checkpoint does not match this model ({len(missing)} tensors missing); delete it and start over.")
    model.load_state_dict(state, strict=False)
    return state


def load_checkpoint(work: Path) -> dict:
    """The checkpoint's tensors and plain values. Read with torch's weights-only unpickler, which builds
    nothing but tensors and plain containers: a crafted file cannot run code here."""
    path = work / CHECKPOINT
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(saved, dict) or not {"trainable", "optimizer", "state"} <= set(saved):
            raise ValueError("not a cmoe fine-tuning checkpoint")
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
        raise CMoEError(f"{path} cannot be read as a fine-tuning checkpoint ({type(error).__name__}); delete {work} "
                        "and start over without --resume.") from error
    return saved


def save_checkpoint(work: Path, model, optimizer, state: dict) -> None:
    tmp = work / (CHECKPOINT + ".tmp")
    torch.save(dict(trainable=trainable_state(model), optimizer=optimizer.state_dict(), state=state), tmp)
    os.replace(tmp, work / CHECKPOINT)
    write_atomically(work / "progress.json", json.dumps({k: v for k, v in state.items() if k != "losses"}))
