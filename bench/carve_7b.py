"""Carve a Llama-2-7B-shaped model (random weights, bfloat16) on a GPU: time and peak memory (issue 27).

    python3 -m bench.carve_7b --calibration ids.pt [--config S3A3E8] [--out carve_7b.json]

The model is built from a config straight on the device (no download, no CPU copy). The calibration is
8 x 2,048 WikiText-2 tokens, tokenised beforehand (`--write-calibration ids.pt` on a machine that has
the data and SmolLM2's tokenizer); ids past Llama-2's vocabulary are folded into it (random weights give
tokens no meaning, only the shapes and the layer-by-layer work count here). `--layers` and `--small` shrink
the model to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers as T

import cmoe
from cmoe.tools.provenance import device_name, git_commit

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
SMALL = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)


def write_calibration(path: Path, samples: int, seqlen: int) -> None:
    from cmoe.data import calibration_tokens
    from cmoe.hf.loading import load_model

    _, tokenizer = load_model("smollm2")
    ids = calibration_tokens(tokenizer, "wikitext2", samples, seqlen, seed=0)
    torch.save(ids, path)
    print(f"wrote {tuple(ids.shape)} WikiText-2 token ids to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=Path, help="token ids [N, L] saved with torch.save")
    parser.add_argument("--write-calibration", type=Path, help="tokenise WikiText-2 into this file and stop")
    parser.add_argument("--config", default="S3A3E8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, help="fewer decoder layers (to check the script)")
    parser.add_argument("--small", action="store_true", help="a small model of the same family (CPU check)")
    parser.add_argument("--out", type=Path, default=Path("carve_7b.json"))
    args = parser.parse_args()
    if args.write_calibration:
        return write_calibration(args.write_calibration, 8, 2048)

    shape = dict(SMALL if args.small else LLAMA2_7B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = T.LlamaConfig(**shape)
    ids = torch.load(args.calibration) % config.vocab_size
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    started = time.perf_counter()
    torch.manual_seed(0)
    with device:
        model = T.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if cuda:
        torch.cuda.synchronize()
    build_seconds = time.perf_counter() - started
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    carved = cmoe.carve_(model, cmoe.CarveConfig.from_name(args.config), ids, progress=True)
    if cuda:
        torch.cuda.synchronize()
    carve_seconds = time.perf_counter() - started
    with torch.no_grad():
        logits = carved(ids[:1, :256].to(device)).logits
    row = dict(
        what="carve of a Llama-2-7B-shaped model (random weights, bfloat16)" if not args.small else "small check",
        config=args.config, device=device_name(device.type), torch=torch.__version__,
        transformers=T.__version__, git=git_commit(), layers=config.num_hidden_layers,
        calibration=list(ids.shape), build_seconds=round(build_seconds, 2), carve_seconds=round(carve_seconds, 2),
        seconds_per_layer=round(carve_seconds / config.num_hidden_layers, 3), weights_gib=round(weights_gib, 2),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        logits_finite=bool(torch.isfinite(logits).all()),
        kmeans_iterations=[layer["kmeans_iterations"] for layer in carved.config.cmoe["record"]["layers"]],
    )
    args.out.write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
