"""Perplexity benchmark (issue 2): SmolLM2-135M dense vs carved, both presets, WikiText-2 and C4.

    .venv/bin/python bench/perplexity.py [--windows 32] [--configs S3A3E8,...] [--presets paper,reference]

Protocol: seqlen 2048, the first N windows of each evaluation text; 8 x 2048 calibration tokens from
WikiText-2 validation, seed 0; carve time excludes model loading. Writes bench/results/perplexity_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import cmoe
from cmoe.data import calibration_tokens, eval_text, tokenize
from cmoe.evaluation import perplexity
from cmoe.models import load_model

RESULTS = Path(__file__).parent / "results" / "perplexity_smollm2.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--configs", default="S3A3E8,S2A2E8,S1A1E8,S2A2E16")
    parser.add_argument("--presets", default="paper,reference")
    parser.add_argument("--sets", default="wikitext2,c4")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()

    _, tokenizer = load_model("smollm2")
    texts = {name: tokenize(tokenizer, eval_text(name)) for name in args.sets.split(",")}
    calibration = calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=0)
    runs = [("dense", None)] + [(c, p) for c in args.configs.split(",") for p in args.presets.split(",")]
    rows = []
    for name, preset in runs:
        model, _ = load_model("smollm2")
        row = dict(config=name, preset=preset or "-")
        if preset:
            started = time.perf_counter()
            model = cmoe.carve(model, cmoe.CarveConfig.from_name(name, preset=preset), calibration, progress=False)
            row["carve_seconds"] = round(time.perf_counter() - started, 1)
        for set_name, ids in texts.items():
            row[set_name] = round(perplexity(model, ids, 2048, args.windows, progress=False), 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = dict(
        benchmark="perplexity", model="SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)",
        protocol=f"seqlen 2048, first {args.windows} windows; calibration wikitext2 validation 8x2048 seed 0",
        command=" ".join([Path(sys.executable).name] + sys.argv), date=time.strftime("%Y-%m-%d"),
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, no GPU",
        torch=torch.__version__, cmoe=cmoe.__version__, git=_git(), rows=rows,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
