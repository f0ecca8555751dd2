"""How fast can the `sparse` preset prefill? One FFN layer of SmolLM2's shape, random weights, 2,048 tokens.

    PYTHONPATH=src:bench .venv/bin/python bench/studies/sparse_prefill.py

For each budget and dtype, timed in one run (medians of 7): dense, `paper` at the same compute, and `sparse`
(every layer completing, or none) two ways: the masked dense products its `forward` runs, and its per-token
step (`SparseNeurons.decode`, the compiled kernel reading only the rows each token keeps, weights hot in cache).
The faster of the two is the best a per-token neuron selection gets from today's kernels. Writes
bench/results/sparse_prefill_cpu.json.
"""
import json, sys, time
from pathlib import Path
sys.path[:0] = ["src", "bench"]
import torch
import cmoe
from cmoe.tools.bench import random_ffn_pair
from budget_speed import PAPER_LAYOUTS, splits_of
from provenance import device_name, git_commit

torch.set_grad_enabled(False)


def median_ms(run, repeats=7):
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * sorted(times)[repeats // 2]


rows = []
for dtype in (torch.float32, torch.bfloat16):
    for budget in (0.75, 0.5, 0.25):
        dense, paper = random_ffn_pair(576, 1536, cmoe.CarveConfig.from_name(PAPER_LAYOUTS[budget]), dtype)
        x = torch.randn(1, 2048, 576, dtype=dtype)
        row = dict(dtype=str(dtype).split(".")[1], budget=budget, dense_ms=median_ms(lambda: dense(x)),
                   paper_ms=median_ms(lambda: paper(x)))
        for name in ("sparse-completed", "sparse-plain"):
            with splits_of(name):
                moe = random_ffn_pair(576, 1536, cmoe.CarveConfig(budget=budget).for_ffn(1536, 3), dtype)[1]
            row[f"{name}_masked_ms"] = median_ms(lambda: moe(x))
            row[f"{name}_per_token_ms"] = median_ms(lambda: moe.shared.decode(x[0]))
            best = min(row[f"{name}_masked_ms"], row[f"{name}_per_token_ms"])
            row[f"{name}_best_over_paper_speed"] = round(row["paper_ms"] / best, 3)
        row = {k: round(v, 1) if k.endswith("_ms") else v for k, v in row.items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
out = Path(__file__).parents[1] / "results" / "sparse_prefill_cpu.json"
out.write_text(json.dumps(dict(benchmark="sparse prefill bound", command="bench/studies/sparse_prefill.py",
                               date=time.strftime("%Y-%m-%d"), machine=f"{device_name(None)}, {torch.get_num_threads()} threads",
                               torch=torch.__version__, git=git_commit(), rows=rows), indent=2))
