"""Perplexity benchmark (issue 2): SmolLM2-135M dense vs carved, both presets, WikiText-2 and C4.

    .venv/bin/python -m bench.perplexity [--windows 32] [--configs S3A3E8,...] [--presets paper,reference]

Protocol: seqlen 2048, the first N windows of each evaluation text; 8 x 2048 calibration tokens from
WikiText-2 validation, seed 0; carve time excludes model loading. Writes bench/results/perplexity_smollm2.json.
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
from cmoe.tools.perplexity import perplexity
from cmoe.hf.loading import load_model
from cmoe.tools.provenance import device_name, git_commit

RESULTS = Path(__file__).parent / "results" / "perplexity_smollm2.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--configs", default="S3A3E8,S2A2E8,S1A1E8,S2A2E16")
    parser.add_argument("--presets", default="paper,reference")
    parser.add_argument("--sets", default="wikitext2,c4")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--no-dense", action="store_true", help="skip the dense model (its numbers do not change)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from an earlier run's JSON")
    args = parser.parse_args()
    if args.plot_only:
        print(f"wrote {plot(json.loads(Path(args.output).read_text()), Path(args.output).with_suffix('.png'))}")
        return

    _, tokenizer = load_model("smollm2")
    texts = {name: tokenize(tokenizer, eval_text(name)) for name in args.sets.split(",")}
    calibration = calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=0)
    runs = ([] if args.no_dense else [("dense", None)]) + [(c, p) for c in args.configs.split(",") for p in args.presets.split(",")]
    rows = finished_rows(Path(args.output), args.windows)
    done = {(r["config"], r["preset"]) for r in rows}
    for name, preset in runs:
        if (name, preset or "-") in done:
            continue
        model, _ = load_model("smollm2")
        row = dict(config=name, preset=preset or "-")
        if preset:
            started = time.perf_counter()
            model = cmoe.carve_(model, cmoe.CarveConfig.from_name(name, preset=preset), calibration, progress=False)
            row["carve_seconds"] = round(time.perf_counter() - started, 1)
        for set_name, ids in texts.items():
            row[set_name] = round(perplexity(model, ids, 2048, args.windows, progress=False), 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_report(rows, args)
    report = write_report(rows, args)
    print(f"wrote {args.output} and {plot(report, Path(args.output).with_suffix('.png'))}")


def finished_rows(path: Path, windows: int) -> list[dict]:
    """Rows of an earlier, stopped run with the same protocol, so that a rerun only does what is missing."""
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    return report["rows"] if report.get("protocol", "").startswith(f"seqlen 2048, first {windows} windows") else []


def write_report(rows: list[dict], args) -> dict:
    """The whole report, rewritten after every row (a stopped run keeps what it measured)."""
    report = dict(
        benchmark="perplexity", model="SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)",
        protocol=f"seqlen 2048, first {args.windows} windows; calibration wikitext2 validation 8x2048 seed 0",
        command=" ".join([Path(sys.executable).name] + sys.argv), date=time.strftime("%Y-%m-%d"),
        machine=f"{device_name(None)}, {torch.get_num_threads()} threads, no GPU",
        torch=torch.__version__, cmoe=cmoe.__version__, git=git_commit(), rows=rows,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    return report


def active_fraction(name: str, hidden: int = 576, width: int = 1536) -> float:
    """FFN parameters a token uses, as a fraction of dense: shared + k routed experts, plus the router."""
    config = cmoe.CarveConfig.from_name(name)
    expert = 3 * hidden * width // config.experts
    return ((config.shared + config.active) * expert + 2 * config.routed * hidden + config.routed) / (3 * hidden * width)


def plot(report: dict, path: Path) -> Path:
    from cmoe.tools.plots import quality_vs_active

    rows = [dict(r, active_fraction=1.0 if r["config"] == "dense" else active_fraction(r["config"])) for r in report["rows"]]
    series = {}
    for preset in ("paper", "reference"):
        for set_name in ("wikitext2", "c4"):
            values = [r.get(set_name) if r["preset"] in (preset, "-") else None for r in rows]
            if any(v is not None for v in values[1:]):
                series[f"{set_name}, {preset}"] = values
    return quality_vs_active(rows, series, path, log_y=True, ylabel="perplexity (log scale)",
                             title=f"SmolLM2-135M carved: perplexity vs FFN active\n({report['protocol']})")


if __name__ == "__main__":
    main()
