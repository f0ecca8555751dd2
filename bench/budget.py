"""Carving to a budget (issue 25): `paper`, `static`, `fitted` and `sparse` at the same FFN compute, SmolLM2-135M.

    PYTHONPATH=src:bench .venv/bin/python bench/budget.py [--budgets 0.75,0.5,0.25] [--presets sparse,fitted,static,paper]
        [--seeds 0] [--windows 32] [--sets wikitext2,c4] [--output bench/results/budget_smollm2.json]

Protocol: seqlen 2048, the first N windows of each evaluation text; calibration 8 x 2,048 WikiText-2
validation tokens sampled with the seed. `sparse`, `fitted` and `static` take `--budget`; `paper` takes the paper's
layout nearest the budget (S3A3E8, S2A2E8, S1A1E8). Each row has the FFN compute counted on the WikiText-2
windows (router included) and the carve time (model loading excluded). Rows already in the output with the
same protocol are kept, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import cmoe
from cmoe.data import calibration_tokens, eval_text, tokenize
from cmoe.hf.loading import load_model
from cmoe.moe.compute import counting_compute
from cmoe.tools.perplexity import perplexity
from provenance import device_name, git_commit

PAPER_LAYOUTS = {0.75: "S3A3E8", 0.5: "S2A2E8", 0.25: "S1A1E8"}


def carve_config(preset: str, budget: float) -> cmoe.CarveConfig:
    if preset in ("paper", "reference"):
        return cmoe.CarveConfig.from_name(PAPER_LAYOUTS[budget], preset=preset)
    return cmoe.CarveConfig(budget=budget, preset=preset)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0.75,0.5,0.25")
    parser.add_argument("--presets", default="sparse,fitted,static,paper")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--sets", default="wikitext2,c4")
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "budget_smollm2.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    _, tokenizer = load_model("smollm2")
    texts = {name: tokenize(tokenizer, eval_text(name)) for name in args.sets.split(",")}
    protocol = (f"seqlen 2048, first {args.windows} windows of {', '.join(texts)}; calibration wikitext2 validation "
                f"8x2048")
    rows = []
    if args.output.exists() and json.loads(args.output.read_text()).get("protocol") == protocol:
        rows = json.loads(args.output.read_text())["rows"]
    done = {(r["preset"], r["budget"], r["seed"]) for r in rows}
    runs = [] if args.no_dense else [("dense", 1.0, 0)]
    runs += [(p, float(b), int(s)) for b in args.budgets.split(",") for s in args.seeds.split(",")
             for p in args.presets.split(",")]
    for preset, budget, seed in runs:
        if (preset, budget, seed) in done:
            continue
        model, _ = load_model("smollm2")
        row = dict(preset=preset, budget=budget, seed=seed)
        if preset != "dense":
            config = carve_config(preset, budget)
            calibration = calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=seed)
            started = time.perf_counter()
            cmoe.carve_(model, config, calibration, progress=False)
            row.update(carve_seconds=round(time.perf_counter() - started, 1), layout=model.carve_record["name"])
        for name, ids in texts.items():
            if preset != "dense" and name == "wikitext2":
                with counting_compute(model) as compute:
                    row[name] = round(perplexity(model, ids, 2048, args.windows, progress=False), 3)
                row["ffn_compute"] = compute()["overall"]
            else:
                row[name] = round(perplexity(model, ids, 2048, args.windows, progress=False), 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(dict(
            benchmark="budget", model="SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)", protocol=protocol,
            command=" ".join([Path(sys.executable).name] + sys.argv), date=time.strftime("%Y-%m-%d"),
            machine=f"{device_name(None)}, {torch.get_num_threads()} threads, no GPU", torch=torch.__version__,
            cmoe=cmoe.__version__, git=git_commit(), rows=rows), indent=2))


if __name__ == "__main__":
    main()
