"""`make demo`: fetch SmolLM2-135M, carve S3A3E8 (paper preset), compare WikiText-2 perplexity with dense."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

DEMO_CONFIG = "S3A3E8"
SEQLEN = 1024


def run_demo(output: str = "demo_results", windows: int = 8, data_dir=None) -> dict:
    import cmoe
    from cmoe.data import calibration_tokens, eval_text, tokenize
    from cmoe.tools.perplexity import perplexity
    from cmoe.hf.loading import load_model
    from cmoe.tools.report import ffn_parameters, table
    from cmoe.run_folder import atomic_directory
    from cmoe.tools.provenance import machine

    print(f"cmoe demo: SmolLM2-135M-Instruct -> {DEMO_CONFIG}, WikiText-2 perplexity on {windows} x {SEQLEN} tokens\n")
    model, tokenizer = load_model("smollm2")
    ids = tokenize(tokenizer, eval_text("wikitext2", data_dir))
    calibration = calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=0, root=data_dir)

    rows = []
    started = time.perf_counter()
    dense_ppl = perplexity(model, ids, SEQLEN, windows, desc="dense ppl")
    dense_ffn = ffn_parameters(model)["total"]
    rows.append(dict(model="dense", ppl=dense_ppl, **_params(ffn_parameters(model), dense_ffn), carve_s=None,
                     eval_s=round(time.perf_counter() - started, 1)))

    config = cmoe.CarveConfig.from_name(DEMO_CONFIG)
    started = time.perf_counter()
    moe = cmoe.carve_(model, config, calibration, calibration_source="wikitext2 (8x2048, seed 0)")
    carve_s = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    moe_ppl = perplexity(moe, ids, SEQLEN, windows, desc=f"{DEMO_CONFIG} ppl")
    rows.append(dict(model=f"{DEMO_CONFIG} ({config.preset})", ppl=moe_ppl, **_params(ffn_parameters(moe), dense_ffn),
                     carve_s=carve_s, eval_s=round(time.perf_counter() - started, 1)))

    columns = [("model", "model"), ("ppl", "WikiText-2 PPL"), ("active_ffn", "active FFN params"),
               ("active_pct", "active %"), ("carve_s", "carve s"), ("eval_s", "eval s")]
    print("\n" + table(rows, columns))
    report = dict(model="SmolLM2-135M-Instruct", config=DEMO_CONFIG, preset=config.preset, seqlen=SEQLEN,
                  windows=windows, calibration="wikitext2 validation, 8 x 2048 tokens, seed 0", rows=rows,
                  machine=machine(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"))
    with atomic_directory(output) as tmp:
        (tmp / "results.json").write_text(json.dumps(report, indent=2))
        (tmp / "results.md").write_text(
            f"# cmoe demo ({report['date']})\n\nSmolLM2-135M-Instruct carved to {DEMO_CONFIG}, "
            f"WikiText-2 test perplexity on the first {windows} windows of {SEQLEN} tokens.\n\n"
            + table(rows, columns, markdown=True) + "\n")
    print(f"\nwrote {Path(output) / 'results.md'} and results.json")
    return report


def _params(counts: dict, dense_total: int) -> dict:
    return dict(active_ffn=counts["active"], active_pct=round(100 * counts["active"] / dense_total, 1))
