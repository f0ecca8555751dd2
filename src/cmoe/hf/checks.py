"""Checks of a carved folder before anything is built from it: the `cmoe` section of config.json against
itself, and the weights' shapes (read from the safetensors headers, without loading a tensor) against it.

A carved model's MoE FFN is sized from config.json, and its compiled kernels read weights through raw
pointers: an edited or damaged folder must get one sentence here, never a crash there.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from cmoe.errors import CMoEError
from cmoe.moe import empty_ffn
from cmoe.moe.spec import REDO, legacy_sparse, spec_from_dict

# A sparse folder saved before the FFN kinds holds its weights one module deeper (`mlp.shared.gate_up_proj`); the
# output bias was the only tensor beside them. transformers' `key_mapping` renames them on load.
LEGACY_SPARSE_KEYS = {r"\.shared\.": "."}


def read_config(folder: Path) -> dict:
    """config.json of `folder` as a dict, or one sentence saying why it cannot be read."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CMoEError(f"{path} cannot be read as JSON ({type(error).__name__}); {REDO}.") from error
    if not isinstance(config, dict):
        raise CMoEError(f"{path} holds no JSON object; {REDO}.")
    return config


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the folder's .safetensors files, from their headers; also checks that each
    file is as long as its header says (a truncated copy fails here, not halfway through loading)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CMoEError(f"{folder} has no .safetensors weights; {REDO}.")
    shapes = {}
    for path in files:
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > path.stat().st_size:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            if 8 + length + max(ends, default=0) > path.stat().st_size:
                raise ValueError("shorter than its header says")
            shapes.update({key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"})
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as error:
            raise CMoEError(f"{path.name} in {folder} is truncated or not a safetensors file ({error}); {REDO}.") from error
    return shapes


def expected_ffn_shapes(spec, legacy: bool = False) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor a carved FFN of this spec saves, by its name inside the FFN module (`legacy`: as a
    sparse folder saved before the FFN kinds names them)."""
    with torch.device("meta"):
        module = empty_ffn(spec)
    shapes = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    if legacy:
        shapes = {(name if name == "down_bias" else "shared." + name): shape for name, shape in shapes.items()}
    return shapes


def check_carved_folder(folder) -> dict:
    """Check a carved folder's config and weights against each other without loading them; returns config.json."""
    folder = Path(folder)
    config = read_config(folder)
    if config.get("cmoe") is None:
        return config  # a dense model: nothing of ours to check
    spec = spec_from_dict(config["cmoe"], config.get("hidden_size"))
    shapes = safetensors_shapes(folder)
    expected = expected_ffn_shapes(spec, legacy_sparse(config["cmoe"]))
    anchor = "router.weight" if "router.weight" in expected else next(iter(expected))
    prefixes = sorted({key[: -len(anchor)] for key in shapes if key.endswith("." + anchor)}, key=_layer_number)
    layers = config.get("num_hidden_layers")
    if not prefixes or (isinstance(layers, int) and len(prefixes) != layers):
        raise CMoEError(f"{folder}'s weights hold {len(prefixes)} carved layers where config.json describes "
                        f"{layers}; {REDO}.")
    for prefix in prefixes:
        for name, shape in expected.items():
            found = shapes.get(prefix + name)
            if found != shape:
                what = "is missing" if found is None else f"has shape {list(found)}"
                raise CMoEError(f"{folder}'s weight {prefix + name} {what} where config.json's cmoe section needs "
                                f"{list(shape)}; {REDO}.")
    return config


def _layer_number(prefix: str) -> int:
    numbers = re.findall(r"\.(\d+)\.", "." + prefix)
    return int(numbers[-1]) if numbers else -1


def check_seqlen(model, seqlen: int, flag: str) -> None:
    """A window may not be longer than the positions the model was built for."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if isinstance(limit, int) and seqlen > limit:
        raise CMoEError(f"{flag} {seqlen} is longer than the {limit} positions this model was built for; pass "
                        f"{flag} {limit} or less.")
