"""GGUF export (issue 26): how close the llama.cpp model is to the cmoe model it was exported from.

    .venv-serve/bin/python -m bench.gguf_export [--windows 8] [--output bench/results/gguf_export_smollm2.json]

Runs in `make serve-test`'s venv (llama-cpp-python). SmolLM2-135M-Instruct carved S1A1E8 (`paper` preset,
calibration 8 x 2,048 WikiText-2 validation tokens, seed 0), exported as `cmoe export` does (routers refitted on
the same 8 x 2,048 calibration tokens), then on the first N windows x 2,048 of WikiText-2 test: perplexity of the dense
model, the cmoe model (its own router), the refitted cmoe model (linear routers, in PyTorch) and the GGUF file
in llama.cpp (its KV cache in float32, and in its default float16); and per layer, how often the refitted router picks the expert cmoe's picks on those windows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cmoe
from cmoe.data import calibration_tokens, eval_text, tokenize
from cmoe.hf.loading import load_model
from cmoe.moe import MoEFFN
from cmoe.serving.gguf import fit_linear_routers, write_gguf
from cmoe.tools.provenance import device_name, git_commit


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    return F.cross_entropy(torch.as_tensor(logits).float()[:-1], window[1:], reduction="sum").item()


def torch_ppl(model, windows) -> float:
    with torch.no_grad():
        nll = sum(window_nll(model(w[None]).logits[0], w) for w in windows)
    return math.exp(nll / sum(len(w) - 1 for w in windows))


def llama_cpp_ppl(path, windows, kv_float32: bool) -> float:
    from llama_cpp import Llama

    kv = dict(type_k=0, type_v=0) if kv_float32 else {}  # ggml type 0: float32; llama.cpp's default is float16
    llm = Llama(model_path=str(path), n_ctx=len(windows[0]), n_batch=512, logits_all=True, verbose=False,
                n_threads=torch.get_num_threads(), **kv)
    nll = 0.0
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        nll += window_nll(np.array(llm.scores[: len(w)]), w)
    return math.exp(nll / sum(len(w) - 1 for w in windows))


def agreement(refitted, originals, windows) -> list[float]:
    """Per layer: the share of tokens on which the refitted router picks the expert cmoe's router would pick,
    on the inputs the refitted model gives that layer."""
    ffns = [m for m in refitted.modules() if isinstance(m, MoEFFN)]
    hits, counts = [0] * len(ffns), [0] * len(ffns)

    def hook(index):
        def count(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            same = module.router.select(x)[1][:, 0] == originals[index].select(x)[1][:, 0]
            hits[index] += same.sum().item()
            counts[index] += len(x)
        return count

    handles = [ffn.register_forward_pre_hook(hook(i)) for i, ffn in enumerate(ffns)]
    with torch.no_grad():
        for w in windows:
            refitted(w[None])
    for handle in handles:
        handle.remove()
    return [round(h / c, 4) for h, c in zip(hits, counts)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gguf_export_smollm2.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model("smollm2")
    ids = tokenize(tokenizer, eval_text("wikitext2")).reshape(-1)
    windows = [ids[i * 2048:(i + 1) * 2048] for i in range(args.windows)]
    row = dict(windows=args.windows, dense=round(torch_ppl(model, windows), 3))
    cmoe.carve_(model, cmoe.CarveConfig.from_name("S1A1E8"), calibration_tokens(tokenizer, "wikitext2", 8, 2048, 0),
                progress=False)
    row["cmoe"] = round(torch_ppl(model, windows), 3)
    originals = [m.router for m in model.modules() if isinstance(m, MoEFFN)]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "out", tokenizer=tokenizer)
        started = time.perf_counter()
        fit = fit_linear_routers(model, calibration_tokens(tokenizer, "wikitext2", 8, 2048, 0), progress=False)
        write_gguf(model, Path(tmp) / "out", Path(tmp) / "m.gguf")
        row["export_seconds"] = round(time.perf_counter() - started, 1)
        row["refitted_cmoe"] = round(torch_ppl(model, windows), 3)
        row["llama_cpp_kv_float32"] = round(llama_cpp_ppl(Path(tmp) / "m.gguf", windows, True), 3)
        row["llama_cpp_kv_float16"] = round(llama_cpp_ppl(Path(tmp) / "m.gguf", windows, False), 3)
    row["agreement_calibration"] = [layer["agreement"] for layer in fit]
    row["agreement_held_out"] = [layer["agreement_held_out"] for layer in fit]
    row["decays"] = [layer["decay"] for layer in fit]
    row["agreement_test"] = agreement(model, originals, windows)
    row["agreement_test_mean"] = round(sum(row["agreement_test"]) / len(row["agreement_test"]), 4)
    print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(dict(
        benchmark="gguf export", model="SmolLM2-135M-Instruct S1A1E8 (paper preset)",
        command=" ".join([Path(sys.executable).name] + sys.argv), date=time.strftime("%Y-%m-%d"),
        machine=f"{device_name(None)}, {torch.get_num_threads()} threads", torch=torch.__version__,
        cmoe=cmoe.__version__, git=git_commit(), rows=[row]), indent=2))


if __name__ == "__main__":
    main()
