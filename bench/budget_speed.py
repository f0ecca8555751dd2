"""Speed at a budget (issue 25): the sparse and fitted presets' FFNs against the paper's at the same compute, and dense.

    .venv/bin/python -m bench.budget_speed [--budgets 0.75,0.5,0.25] [--dtypes float32,bfloat16]
        [--presets sparse,fitted]

SmolLM2's FFN shape (hidden 576, intermediate 1536) with random weights (speed does not depend on them; a
random router spreads tokens about evenly, as the balanced ones do): prefill of 2,048 tokens, one layer,
and decode at batch 1 through 30 layers in turn (each its own copy, so weights come from memory). Dense,
`paper` (S3A3E8, S2A2E8, S1A1E8) and each preset of --presets (at --budget) are timed interleaved in one run, medians of
repeated runs. Writes bench/results/speed_budget_presets_cpu.json. The pseudo-presets `sparse-completed` and `sparse-plain`
are `sparse` with every layer completing its kept neurons' sums, or none (on random inputs the carve's own choice
may differ from a real model's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import cmoe
from cmoe.core import sparse as sparse_calibration
from cmoe.tools.bench import interleaved_medians, keep_freed_memory
from bench.fixtures import random_ffn_pair
from cmoe.tools.provenance import device_name, git_commit

PAPER_LAYOUTS = {0.75: "S3A3E8", 0.5: "S2A2E8", 0.25: "S1A1E8"}
HIDDEN, INTERMEDIATE, LAYERS = 576, 1536, 30


@contextmanager
def splits_of(name: str):
    """`sparse-completed`: only completing splits; `sparse-plain`: none; other names: the carve's own."""
    saved = sparse_calibration.HIDDEN_SHARES, sparse_calibration.COMPLETED_INPUT_SHARES
    if name == "sparse-completed":
        sparse_calibration.HIDDEN_SHARES = ()
    elif name == "sparse-plain":
        sparse_calibration.COMPLETED_INPUT_SHARES = ()
    try:
        yield
    finally:
        sparse_calibration.HIDDEN_SHARES, sparse_calibration.COMPLETED_INPUT_SHARES = saved


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0.75,0.5,0.25")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--presets", default="sparse,fitted")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "speed_budget_presets_cpu.json")
    args = parser.parse_args()
    keep_freed_memory()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for budget in map(float, args.budgets.split(",")):
            presets = args.presets.split(",")
            configs = dict(paper=cmoe.CarveConfig.from_name(PAPER_LAYOUTS[budget]),
                           **{p: cmoe.CarveConfig(budget=budget, preset=p.split("-")[0]).for_ffn(INTERMEDIATE, 3)
                              for p in presets})
            ffns = {}
            for name, config in configs.items():
                with splits_of(name):
                    ffns[name] = [random_ffn_pair(HIDDEN, INTERMEDIATE, config, dtype, seed=layer) for layer in range(LAYERS)]
            dense = [pair[0] for pair in ffns["paper"]]
            models = dict(dense=dense, **{name: [pair[1] for pair in pairs] for name, pairs in ffns.items()})
            prompt = torch.randn(1, 2048, HIDDEN, dtype=dtype)
            prefill = interleaved_medians({name: (lambda m=m: m[0](prompt)) for name, m in models.items()},
                                          args.repeats // 3, 2, torch.device("cpu"))
            steps = [torch.randn(1, 1, HIDDEN, dtype=dtype) for _ in range(LAYERS)]
            decode = interleaved_medians(
                {name: (lambda m=m: [ffn(x) for ffn, x in zip(m, steps)]) for name, m in models.items()},
                args.repeats, 3, torch.device("cpu"))
            row = dict(dtype=dtype_name, budget=budget, **{name: config.name for name, config in configs.items()},
                       prefill_ms={k: round(1e3 * v, 3) for k, v in prefill.items()},
                       decode_ms_per_layer={k: round(1e3 * v / LAYERS, 4) for k, v in decode.items()})
            for preset in presets:
                row[f"{preset}_over_paper_speed"] = dict(prefill=round(prefill["paper"] / prefill[preset], 3),
                                                         decode=round(decode["paper"] / decode[preset], 3))
                row[f"{preset}_over_dense_speed"] = dict(prefill=round(prefill["dense"] / prefill[preset], 3),
                                                         decode=round(decode["dense"] / decode[preset], 3))
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(dict(
        benchmark="budget speed", command=" ".join([Path(sys.executable).name] + sys.argv),
        date=time.strftime("%Y-%m-%d"), machine=f"{device_name(None)}, {torch.get_num_threads()} threads, no GPU",
        torch=torch.__version__, cmoe=cmoe.__version__, git=git_commit(), rows=rows), indent=2))


if __name__ == "__main__":
    main()
