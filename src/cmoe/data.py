"""Text in: where the data sets live, evaluation texts, and seeded calibration windows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cmoe.errors import CMoEError

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


_LOCAL_FILES = {"wikitext2": "wikitext2/test.txt", "c4": "c4/c4_sample.jsonl", "ptb": "ptb/test.txt"}


def online() -> bool:
    """Whether the Hugging Face hub can be reached (and offline mode is not asked for)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _local_root(root, name: str) -> Path | None:
    """The data folder when it has `name`'s files; None when there is none and the hub can stand in."""
    try:
        folder = data_dir(root)
    except CMoEError:
        if root is None and online():
            return None
        raise
    if not (folder / _LOCAL_FILES[name]).is_file() and root is None and online():
        return None
    return folder


def _hub_text(name: str, use: str) -> str:
    """The same texts from the hub through `datasets`, for an online machine without the data folder.
    C4 comes from the first validation shard of allenai/c4 (the data folder's sample is different text)."""
    import datasets

    if name == "wikitext2":
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test" if use == "eval" else "validation")
        return "\n\n".join(rows["text"])
    if name == "ptb":
        rows = datasets.load_dataset("ptb_text_only", "penn_treebank", split="test")
        return " ".join(rows["sentence"])
    shard = "en/c4-validation.00000-of-00008.json.gz"
    docs = datasets.load_dataset("allenai/c4", data_files={"validation": shard}, split="validation")["text"]
    return "\n\n".join(docs[:C4_EVAL_DOCS] if use == "eval" else docs[C4_EVAL_DOCS:C4_EVAL_DOCS * 4])


def _read(path: Path) -> str:
    if not path.is_file():
        raise CMoEError(f"Data file {path} is missing; point --data-dir (or CMOE_DATA_DIR) at a folder that has it.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CMoEError(f"{path} is not UTF-8 text (byte {error.start} cannot be read); give a plain text file.") from error
    except OSError as error:
        raise CMoEError(f"{path} cannot be read ({error.strerror}); check the file and its permissions.") from error
    if "\x00" in text:
        raise CMoEError(f"{path} holds NUL bytes, so it is binary rather than text; give a plain text file.")
    return text


def _c4_docs(root: Path) -> list[str]:
    lines = _read(root / "c4" / "c4_sample.jsonl").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def eval_text(name: str, root: str | os.PathLike | None = None) -> str:
    """The evaluation text of a data set, joined as the common evaluation code joins it."""
    if name not in EVAL_SETS:
        raise CMoEError(f"Unknown evaluation set {name!r}; use one of {', '.join(EVAL_SETS)}.")
    local = _local_root(root, name)
    if local is None:
        return _hub_text(name, "eval")
    if name == "wikitext2":
        return _read(local / "wikitext2" / "test.txt")
    if name == "c4":
        return "\n\n".join(_c4_docs(local)[:C4_EVAL_DOCS])
    return " ".join(line.strip() for line in _read(local / "ptb" / "test.txt").splitlines())


def calibration_text(source: str, root: str | os.PathLike | None = None) -> str:
    """Calibration text that never overlaps evaluation: WikiText-2 validation, C4 documents 500 on, or a file.

    Sources joined by `+` ("wikitext2+c4") give their texts one after another, so that windows sampled from
    the result mix the domains in proportion to their sizes.
    """
    if "+" in source and not Path(source).is_file():
        return "\n\n".join(calibration_text(part, root) for part in source.split("+"))
    if source in CALIBRATION_SETS:
        local = _local_root(root, source)
        if local is None:
            return _hub_text(source, "calibration")
        if source == "wikitext2":
            return _read(local / "wikitext2" / "valid.tokens.txt")
        return "\n\n".join(_c4_docs(local)[C4_EVAL_DOCS:])
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
    return random_windows(ids, samples, seqlen, torch.Generator().manual_seed(seed))


def random_windows(ids: torch.Tensor, count: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """`count` windows of `seqlen` tokens from ids [n] at random starts drawn from `generator`: [count, seqlen]."""
    starts = torch.randint(0, ids.numel() - seqlen, (count,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_source_label(source: str, samples: int, seqlen: int, seed: int) -> str:
    """How a carve record names its calibration: `wikitext2 (8x2048, seed 0)`."""
    return f"{source} ({samples}x{seqlen}, seed {seed})"


def calibration_tokens(tokenizer, source: str = "wikitext2", samples: int = 8, seqlen: int = 2048, seed: int = 0,
                       root: str | os.PathLike | None = None) -> torch.Tensor:
    """Seeded calibration windows [samples, seqlen] from a named set or a text file."""
    return sample_windows(tokenize(tokenizer, calibration_text(source, root)), samples, seqlen, seed)
