"""`make demo`: fetch SmolLM2-135M, carve it to 3/4 of the FFN compute two ways (the paper's S3A3E8 and
--budget 0.75, which takes the sparse preset), compare WikiText-2 perplexity and the FFN compute counted with
dense."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

SEQLEN = 1024
DEMO_BUDGET = 0.75


def run_demo(output: str = "demo_results", windows: int = 8, data_dir=None) -> dict:
    import cmoe
    from cmoe.data import calibration_source_label, calibration_tokens, eval_text, tokenize
    from cmoe.hf.loading import load_model
    from cmoe.moe.compute import counting_compute
    from cmoe.run_folder import atomic_directory
    from cmoe.tools.perplexity import perplexity
    from cmoe.tools.provenance import machine
    from cmoe.tools.report import table

    configs = {"S3A3E8 (paper preset)": cmoe.CarveConfig.from_name("S3A3E8"),
               f"--budget {DEMO_BUDGET} (sparse preset)": cmoe.CarveConfig(budget=DEMO_BUDGET)}
    print(f"cmoe demo: SmolLM2-135M-Instruct carved to {100 * DEMO_BUDGET:.0f}% of the FFN compute, the paper's way "
          f"and the default way (--budget); WikiText-2 perplexity on {windows} x {SEQLEN} tokens\n")
    dense, tokenizer = load_model("smollm2")
    ids = tokenize(tokenizer, eval_text("wikitext2", data_dir))
    calibration = calibration_tokens(tokenizer, "wikitext2", 8, 2048, seed=0, root=data_dir)

    started = time.perf_counter()
    rows = [dict(model="dense", ppl=perplexity(dense, ids, SEQLEN, windows, desc="dense ppl"), compute=100.0,
                 carve_s=None, eval_s=round(time.perf_counter() - started, 1))]
    for name, config in configs.items():
        started = time.perf_counter()
        carved = cmoe.carve_(copy.deepcopy(dense), config, calibration,
                             calibration_source=calibration_source_label("wikitext2", 8, 2048, 0))
        carve_s = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        with counting_compute(carved) as compute:
            ppl = perplexity(carved, ids, SEQLEN, windows, desc=f"{carved.carve_record['name']} ppl")
        rows.append(dict(model=f"{carved.carve_record['name']}, {name}", ppl=ppl,
                         compute=round(100 * compute()["overall"], 1), carve_s=carve_s,
                         eval_s=round(time.perf_counter() - started, 1)))
        del carved

    columns = [("model", "model"), ("ppl", "WikiText-2 PPL"), ("compute", "FFN compute % (counted)"),
               ("carve_s", "carve s"), ("eval_s", "eval s")]
    print("\n" + table(rows, columns))
    report = dict(model="SmolLM2-135M-Instruct", budget=DEMO_BUDGET, seqlen=SEQLEN, windows=windows,
                  calibration="wikitext2 validation, 8 x 2048 tokens, seed 0", rows=rows, machine=machine(),
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    with atomic_directory(output) as tmp:
        (tmp / "results.json").write_text(json.dumps(report, indent=2))
        (tmp / "results.md").write_text(
            f"# cmoe demo ({report['date']})\n\nSmolLM2-135M-Instruct carved to {100 * DEMO_BUDGET:.0f}% of the FFN "
            f"compute, WikiText-2 test perplexity on the first {windows} windows of {SEQLEN} tokens; FFN compute "
            f"counted on those tokens, router included.\n\n" + table(rows, columns, markdown=True) + "\n")
    print(f"\nwrote {Path(output) / 'results.md'} and results.json")
    return report
