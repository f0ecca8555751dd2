"""Quick ablation of carving choices on SmolLM2-135M: perplexity on the first few windows.

    .venv/bin/python bench/ablation.py --configs S1A1E8 --variants reference paper paper:activation=cosine

A variant is a preset, optionally with field overrides: `paper:activation=contribution,k_act=32`.
Each result row is appended to bench/results/ablation_smollm2.jsonl as soon as it is measured.
Calibration: 8 x 2048 WikiText-2 validation tokens, seed 0 (the benchmark protocol); `--seeds 0,1,2`
repeats each carve with other seeds (calibration windows and carving), to see how much of a difference
between variants is chance.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cmoe
from cmoe.data import calibration_tokens, eval_text, tokenize
from cmoe.tools.perplexity import perplexity
from cmoe.hf.loading import load_model

RESULTS = Path(__file__).parent / "results" / "ablation_smollm2.jsonl"


def parse_variant(text: str) -> tuple[str, dict]:
    preset, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        overrides[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return preset, overrides


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="S1A1E8")
    parser.add_argument("--variants", nargs="+", default=["reference", "paper"])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    parser.add_argument("--sets", default="wikitext2", help="evaluation sets, comma separated (default wikitext2)")
    parser.add_argument("--seeds", default="0", help="calibration and carving seeds, comma separated (default 0)")
    args = parser.parse_args()

    _, tokenizer = load_model("smollm2")
    sets = {name: tokenize(tokenizer, eval_text(name)) for name in args.sets.split(",")}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs = [(None, None, 0)] if args.dense else []
    runs += [(name, variant, seed) for seed in seeds for name in args.configs.split(",") for variant in args.variants]
    for name, variant, seed in runs:
        model, _ = load_model("smollm2")
        row = dict(config=name or "dense", variant=variant or "-", windows=args.windows)
        if name:
            preset, overrides = parse_variant(variant)
            config = cmoe.CarveConfig.from_name(name, preset=preset, seed=seed, **overrides)
            calibration = calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=seed)
            row["seed"] = seed
            started = time.perf_counter()
            model = cmoe.carve_(model, config, calibration, progress=False)
            row["carve_seconds"] = round(time.perf_counter() - started, 1)
            layers = model.carve_record["layers"]
            row["imbalance_after"] = round(sum(r.get("imbalance_after", 1) for r in layers) / len(layers), 3)
        for name, ids in sets.items():
            row[name] = round(perplexity(model, ids, 2048, args.windows, progress=False), 2)
        print(json.dumps(row), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
