"""Markdown tables for BENCHMARKS.md from the raw results in bench/results.

    .venv/bin/python -m bench.tables speed bench/results/speed_cpu_float32.json
    .venv/bin/python -m bench.tables finetune bench/results/finetune_cuda.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cmoe.tools.report import table
from bench.finetune import UNRECORDED


def _ffn_label(row: dict) -> str:
    return f"FFN (each of {row['layers']} layers in turn)" if row.get("layers", 1) > 1 else "FFN (middle layer)"


def speed(path: Path) -> str:
    report = json.loads(path.read_text())
    rows = []
    for r in report["rows"]:
        if r["model"].startswith("SmolLM2"):
            what = "SmolLM2-135M, " + ("whole model" if r["level"] == "model" else _ffn_label(r))
        else:
            what = "Llama-2-7B-shaped FFN"
        if r.get("cuda_graph"):
            what += ", CUDA graph"
        if r["mode"] == "memory":
            rows.append(dict(what="SmolLM2-135M, weights in memory", config=r["config"], mode="memory", unit="MiB",
                             dense=r["dense_mb"], carved=r["carved_mb"], ratio=f"carved/dense {r['ratio']:.4f}",
                             ideal="-"))
            continue
        size = f"{r['tokens']:,} tokens" if r["mode"] == "prefill" or r["level"] == "ffn" else f"batch {r['batch']}"
        if "dense_ms" in r:
            dense, carved, unit = r["dense_ms"], r["carved_ms"], "ms"
        else:
            dense, carved, unit = r["dense_tok_s"], r["carved_tok_s"], "tok/s"
        ideal = r.get("ideal_ratio", r.get("ffn_ideal_ratio"))
        rows.append(dict(what=what, config=r["config"], mode=f"{r['mode']}, {size}", unit=unit,
                         dense=dense, carved=carved, ratio=f"{r['ratio']:.2f}x",
                         ideal=f"{ideal:.2f}x" + (" (FFN)" if r["level"] == "model" else "")))
        if "dense_kernel_ms" in r:  # the dense FFN through the carved model's decode kernel: carving's share
            rows.append(dict(rows[-1], what=what + ", dense also through the kernel", dense=r["dense_kernel_ms"],
                             ratio=f"{r['ratio_same_kernel']:.2f}x"))
    header = (f"{report['device']}, {report['threads']} threads, {report['dtype']}, torch {report['torch']}, "
              f"{report['date']}, `{report['command']}`\n\n")
    return header + table(rows, [("what", "what"), ("config", "config"), ("mode", "mode"), ("unit", "unit"),
                                 ("dense", "dense"), ("carved", "carved"), ("ratio", "dense/carved"),
                                 ("ideal", "ideal")], markdown=True)


DENSE_PPL = dict(wikitext2=21.81, c4=36.01)  # SmolLM2-135M, the 32-window protocol (BENCHMARKS.md)


def gap_closed(row: dict, key: str) -> float:
    """Share of the perplexity gap to dense that fine-tuning closed."""
    before, after = row["before"][key], row["after"][key]
    return (before - after) / (before - DENSE_PPL[key])


SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32"}


def finetune(path: Path) -> str:
    rows = []
    for r in map(json.loads, path.read_text().splitlines()):
        threads = r["machine"].rsplit(", ", 1)[1].split()[0] if "threads" in r["machine"] else "GPU"
        loss = r["loss"] + (f" + layers x{r['hidden_weight']:g}" if r.get("hidden_weight") else "")
        old = UNRECORDED["cuda" if threads == "GPU" else "cpu"]
        row = dict(config=r["config"], loss=loss, data=r.get("data", "wikitext2"), lr=f"{r.get('lr', 1e-4):g}",
                   router_lr=f"{r.get('router_lr', 1e-3):g}", schedule=r.get("schedule", "constant"),
                   window=f'{r.get("batch_size", old["batch_size"])} x {r.get("seqlen", 2048):,}', seed=r.get("seed", 0),
                   threads=threads, precision=SHORT_DTYPE[r.get("precision", old["precision"])], tokens=r["tokens"],
                   seconds=round(r["train_seconds"]))
        for key in ("wikitext2", "c4", "piqa", "arc_easy", "hellaswag"):
            if key in r["after"]:
                row[key] = f"{r['before'][key]:.4g} -> {r['after'][key]:.4g}"
        stages = [r["imbalance_before"], r.get("imbalance_trained"), r["imbalance_after"]]
        row["load"] = " -> ".join(f"{v:.2f}" for v in stages if v is not None)
        row["gap"] = " / ".join(f"{gap_closed(r, key):.0%}" for key in ("wikitext2", "c4") if key in r["after"])
        rows.append(row)
    return table(rows, [("config", "config"), ("loss", "loss"), ("data", "trained on"), ("lr", "LoRA lr"),
                        ("router_lr", "router lr"), ("schedule", "schedule"), ("window", "windows a step"), ("seed", "seed"),
                        ("threads", "threads"), ("precision", "matmuls"), ("tokens", "tokens"), ("seconds", "train s"),
                        ("wikitext2", "WikiText-2 PPL"), ("c4", "C4 PPL"), ("piqa", "PIQA"),
                        ("arc_easy", "ARC-E"), ("hellaswag", "HellaSwag"), ("gap", "PPL gap closed"),
                        ("load", "load max/mean")],
                 markdown=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("speed", "finetune"))
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    print(dict(speed=speed, finetune=finetune)[args.kind](args.path))


if __name__ == "__main__":
    main()
