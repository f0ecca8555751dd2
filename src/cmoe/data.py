"""Text in: where the data sets live, evaluation texts, and seeded calibration windows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import CMoEError

# Evaluation texts, the standard way each is joined (see the data README).
EVAL_SETS = ("wikitext2", "c4", "ptb")
CALIBRATION_SETS = ("wikitext2", "c4")
C4_EVAL_DOCS = 500  # c4_sample.jsonl: documents 0-499 are for evaluation, 500 on for calibration


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $CMOE_DATA_DIR, else ../shared/data (beside the working folder or this checkout)."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get("CMOE_DATA_DIR"):
        candidates.append(Path(os.environ["CMOE_DATA_DIR"]))
    else:
        candidates += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise CMoEError(
        f"No data directory found (looked in {', '.join(str(c) for c in candidates)}); "
        "pass --data-dir or set CMOE_DATA_DIR."
    )


def _read(path: Path) -> str:
    if not path.is_file():
        raise CMoEError(f"Data file {path} is missing; point --data-dir (or CMOE_DATA_DIR) at a folder that has it.")
    return path.read_text(encoding="utf-8")


def _c4_docs(root: Path) -> list[str]:
    lines = _read(root / "c4" / "c4_sample.jsonl").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def eval_text(name: str, root: str | os.PathLike | None = None) -> str:
    """The evaluation text of a data set, joined as the common evaluation code joins it."""
    if name not in EVAL_SETS:
        raise CMoEError(f"Unknown evaluation set {name!r}; use one of {', '.join(EVAL_SETS)}.")
    root = data_dir(root)
    if name == "wikitext2":
        return _read(root / "wikitext2" / "test.txt")
    if name == "c4":
        return "\n\n".join(_c4_docs(root)[:C4_EVAL_DOCS])
    return " ".join(line.strip() for line in _read(root / "ptb" / "test.txt").splitlines())


def calibration_text(source: str, root: str | os.PathLike | None = None) -> str:
    """Calibration text that never overlaps evaluation: WikiText-2 validation, C4 documents 500 on, or a file."""
    if source == "wikitext2":
        return _read(data_dir(root) / "wikitext2" / "valid.tokens.txt")
    if source == "c4":
        return "\n\n".join(_c4_docs(data_dir(root))[C4_EVAL_DOCS:])
    path = Path(source)
    if not path.is_file():
        raise CMoEError(f"Calibration source {source!r} is neither {' nor '.join(CALIBRATION_SETS)} nor a text file.")
    return _read(path)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one row of token ids [1, n] (no special tokens added)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids


def sample_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`samples` random windows of `seqlen` tokens from ids [1, n], seeded: [samples, seqlen]."""
    ids = ids.reshape(-1)
    if samples < 1 or seqlen < 1:
        raise CMoEError(f"Calibration needs at least one window of at least one token, got {samples} x {seqlen}.")
    if ids.numel() <= seqlen:
        raise CMoEError(
            f"The calibration text has {ids.numel()} tokens, too few for windows of {seqlen}; "
            "give a longer text or a smaller --calib-seqlen."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_tokens(tokenizer, source: str = "wikitext2", samples: int = 8, seqlen: int = 2048, seed: int = 0,
                       root: str | os.PathLike | None = None) -> torch.Tensor:
    """Seeded calibration windows [samples, seqlen] from a named set or a text file."""
    return sample_windows(tokenize(tokenizer, calibration_text(source, root)), samples, seqlen, seed)
