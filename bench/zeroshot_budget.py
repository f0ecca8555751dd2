"""Zero-shot at a budget (issue 25): a `--budget` carve of SmolLM2-135M on PIQA, ARC-Easy and HellaSwag.

    .venv/bin/python -m bench.zeroshot_budget [--budget 0.75] [--preset sparse]
        [--output bench/results/zeroshot_budget_smollm2.json]

Protocol as bench/zeroshot.py's (issue 3), whose dense row it is compared with: calibration 8 x 2,048
WikiText-2 validation tokens, seed 0; lm-evaluation-harness on the local task files, zero-shot; PIQA and
ARC-Easy whole, HellaSwag's first 1,000 items. Rows are added to the output file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cmoe
from cmoe.data import calibration_tokens
from cmoe.hf.loading import load_model
from cmoe.tools.zeroshot import evaluate_tasks
from cmoe.tools.provenance import device_name, git_commit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.75)
    parser.add_argument("--preset", default="sparse")
    parser.add_argument("--limit", type=int, help="items per task (quick runs)")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).parent / "results" / "zeroshot_budget_smollm2.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model("smollm2")
    started = time.perf_counter()
    cmoe.carve_(model, cmoe.CarveConfig(budget=args.budget, preset=args.preset),
                calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=0))
    carve_seconds = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    scores = evaluate_tasks(model, tokenizer, ["piqa", "arc_easy", "hellaswag"], limit=args.limit,
                            limits={"hellaswag": min(1000, args.limit or 1000)})
    rows = json.loads(args.output.read_text())["rows"] if args.output.exists() else []
    rows.append(dict(preset=args.preset, budget=args.budget, layout=model.carve_record["name"], limit=args.limit,
                     carve_seconds=carve_seconds, eval_seconds=round(time.perf_counter() - started, 1), tasks=scores))
    args.output.write_text(json.dumps(dict(machine=f"{device_name(None)}, {torch.get_num_threads()} threads",
                                           git=git_commit(), date=time.strftime("%Y-%m-%d"), rows=rows), indent=1))
    print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
