"""Recovery fine-tuning benchmark (issue 5): SmolLM2-135M carved, then fine-tuned, quality before and after.

    .venv/bin/python -m bench.finetune [--configs S2A2E8,S3A3E8] [--losses lm,distill] [--max-minutes 20]
                                       [--samples 2048 --seqlen 2048 --batch-size 1] [--device cpu|cuda]

For each configuration: carve with the paper preset (calibration 8 x 2048 WikiText-2 validation tokens,
seed 0), measure WikiText-2 and C4 perplexity (seqlen 2048, first 32 windows) and zero-shot PIQA,
ARC-Easy and HellaSwag (first 1,000 items); then for each loss fine-tune (training text: `--data`, by
default WikiText-2 validation; never the evaluation text) until the samples or the time limit run out, and
measure again.
Each finished run is appended to bench/results/finetune_<device>.jsonl, and runs already there are skipped;
a configuration's "before" is taken from an earlier row where one measured the same items (carving is seeded).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import cmoe
from cmoe.data import calibration_tokens
from cmoe.tools.perplexity import evaluate_perplexity
from cmoe.tools.finetune import FinetuneConfig, finetune, training_precision
from cmoe.hf.loading import load_model
from cmoe.tools.provenance import device_name

RESULTS = Path(os.environ.get("CMOE_RESULTS", Path(__file__).parent / "results"))  # elsewhere on a lent GPU


def quality(model, tokenizer, tasks: list[str], device: str, limit: int | None = None) -> dict:
    scores = {name: round(v["ppl"], 3) for name, v in
              evaluate_perplexity(model, tokenizer, ["wikitext2", "c4"], 2048, 32, progress=False).items()}
    if tasks:
        from cmoe.tools.zeroshot import evaluate_tasks

        batch = 64 if device == "cuda" else 16
        results = evaluate_tasks(model, tokenizer, tasks, limit, batch, limits={"hellaswag": min(1000, limit or 1000)})
        for task, metrics in results.items():
            scores[task] = round(metrics.get("acc_norm", metrics["acc"]), 4)
    return scores


# Rows from before --precision and --batch-size were recorded trained like this, by device
UNRECORDED = dict(cpu=dict(precision="float32", batch_size=1), cuda=dict(precision="bfloat16", batch_size=8))


def run_key(row: dict, device: str) -> tuple:
    """The settings that tell fine-tuning runs apart (older rows lack the newer ones: their defaults)."""
    old = UNRECORDED[device]
    return (row["config"], row["loss"], row.get("data", "wikitext2"), row.get("lr", 1e-4), row.get("seqlen", 2048),
            row.get("hidden_weight", 0.0), row.get("schedule", "constant"), row.get("router_lr", 1e-3),
            row.get("seed", 0), row.get("precision", old["precision"]), row.get("batch_size", old["batch_size"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="S2A2E8,S3A3E8")
    parser.add_argument("--losses", default="lm,distill")
    parser.add_argument("--max-minutes", type=float, default=20)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--tasks", default="piqa,arc_easy,hellaswag", help="zero-shot tasks ('' for none)")
    parser.add_argument("--limit", type=int, help="zero-shot items per task (default: all; HellaSwag at most 1,000)")
    parser.add_argument("--lr", type=float, default=FinetuneConfig.lr, help="LoRA learning rate")
    parser.add_argument("--hidden-weight", type=float, default=0.0,
                        help="distillation's layer-output term weight (cmoe finetune --hidden-weight)")
    parser.add_argument("--router-lr", type=float, default=FinetuneConfig.router_lr,
                        help="router rows and gate scales learning rate")
    parser.add_argument("--schedule", default=FinetuneConfig.schedule, help="learning-rate schedule: cosine or constant")
    parser.add_argument("--data", default="wikitext2", help="training text (a `cmoe finetune --data` source)")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed: window order and LoRA initialisation")
    parser.add_argument("--precision", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="training matrix products (cmoe finetune --precision)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    results = RESULTS / f"finetune_{args.device}.jsonl"
    finished = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {run_key(r, args.device) for r in finished}
    precision = training_precision(args.precision, torch.device(args.device))
    tasks = [t for t in args.tasks.split(",") if t]
    machine = device_name(args.device) + ("" if args.device == "cuda" else f", {torch.get_num_threads()} threads")
    # carving is seeded, so an earlier row's "before" is this run's where it measured the same items on the
    # same machine and thread count (float sums, and so the carve, depend on those): reuse it
    measured_before = {r["config"]: r["before"] for r in finished if r["machine"] == machine
                       and r.get("zero_shot_limit") == args.limit and set(tasks) <= set(r["before"])}
    dense, tokenizer = load_model("smollm2", device=args.device)
    dense.eval()
    calibration = calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=0)

    def settings(name: str, loss: str) -> dict:  # what a row records of the run, and what tells runs apart
        hidden_weight = args.hidden_weight if loss == "distill" else 0.0  # the layer-output term is distillation's
        return dict(config=name, loss=loss, data=args.data, lr=args.lr, router_lr=args.router_lr,
                    schedule=args.schedule, seqlen=args.seqlen, batch_size=args.batch_size,
                    hidden_weight=hidden_weight, seed=args.seed, precision=precision)

    for name in args.configs.split(","):
        losses = [loss for loss in args.losses.split(",") if run_key(settings(name, loss), args.device) not in done]
        if not losses:
            continue
        carved = cmoe.carve_(copy.deepcopy(dense), cmoe.CarveConfig.from_name(name), calibration, progress=False)
        reused = name in measured_before
        before = measured_before[name] if reused else quality(carved.eval(), tokenizer, tasks, args.device, args.limit)
        print(json.dumps(dict(config=name, before=before, reused=reused)), flush=True)
        for loss in losses:
            run = settings(name, loss)
            config = FinetuneConfig(**{k: v for k, v in run.items() if k != "config"}, samples=args.samples,
                                    max_minutes=args.max_minutes)
            with tempfile.TemporaryDirectory() as tmp:
                student = copy.deepcopy(carved)
                summary = finetune(student, tokenizer, config, Path(tmp) / "out",
                                   teacher=dense if loss == "distill" else None, progress=False)
                tuned, _ = load_model(str(Path(tmp) / "out"), device=args.device)
            after = quality(tuned.eval(), tokenizer, tasks, args.device, args.limit)
            row = dict(**run, machine=machine, date=time.strftime("%Y-%m-%d"), steps=summary["steps"],
                       tokens=summary["tokens"], train_seconds=summary["seconds"], zero_shot_limit=args.limit,
                       first_loss=summary["first_loss"], last_loss=summary["last_loss"],
                       imbalance_before=summary["imbalance_before"], imbalance_trained=summary["imbalance_trained"],
                       imbalance_after=summary["imbalance_after"], gradient_checkpointing=summary["gradient_checkpointing"],
                       before=before, before_reused=reused, after=after, loss_curve=summary["losses"])
            print(json.dumps(row), flush=True)
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            del student, tuned


if __name__ == "__main__":
    main()
