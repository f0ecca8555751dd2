"""Numbers people read: FFN parameter counts and plain-text / markdown tables."""

from __future__ import annotations

import json

from cmoe.hf.adapters import adapter_for
from cmoe.hf.modeling import is_carved


def ffn_parameters(model) -> dict:
    """FFN parameters in all and those a token uses (shared + k routed experts + router), over all layers."""
    adapter = adapter_for(model)
    total = active = 0
    for layer in adapter.layers(model):
        if is_carved(model):
            carved = adapter.ffn_module(layer)
            layer_total = sum(p.numel() for p in carved.parameters())
            experts = carved.experts if carved.kind == "moe" else None  # a sparse FFN may use every row
            per_expert = 0 if experts is None else experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
            routed = 0 if experts is None else experts.gate_up_proj.numel() + experts.down_proj.numel()
            top_k = 0 if experts is None else carved.router.top_k
            total += layer_total
            active += layer_total - routed + top_k * per_expert
        else:
            ffn = adapter.read(layer, model.config)
            n = sum(t.numel() for t in (ffn.gate, ffn.up, ffn.down, ffn.up_bias, ffn.down_bias) if t is not None)
            total += n
            active += n
    return dict(total=total, active=active)


def table(rows: list[dict], columns: list[tuple[str, str]], markdown: bool = False) -> str:
    """rows: dicts; columns: (key, header). Numbers are formatted; missing values show as '-'."""
    def fmt(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if markdown:
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"
                  for row in cells]
    else:
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


# -- the sweep's report folder -----------------------------------------------------------------------------

HEADLINE = ("acc_norm", "acc")  # the accuracy plotted per task: acc_norm where the task has it


def _model_cells(row: dict) -> dict:
    compute = row.get("ffn_compute")
    return dict(model=row["config"], preset=row.get("preset", "-"), active=f"{100 * row['active_fraction']:.1f}",
                compute=None if compute is None else f"{100 * compute:.1f}")


def report_tables(rows: list[dict]) -> dict[str, str]:
    """Markdown tables, one per metric, dense first: {title: table}."""
    model_columns = [("model", "model"), ("preset", "preset"), ("active", "FFN weights a token can use %"),
                     ("compute", "FFN compute counted %")]
    tables = {}
    sets = [s for s in rows[0].get("perplexity", {})]
    if sets:
        cells = [dict(_model_cells(r), **r["perplexity"]) for r in rows]
        tables["Perplexity (lower is better)"] = table(cells, model_columns + [(s, s) for s in sets], markdown=True)
    tasks = list(rows[0].get("tasks", {}))
    for metric in ("acc", "acc_norm"):
        names = [t for t in tasks if metric in rows[0]["tasks"][t]]
        if not names:
            continue
        cells = []
        for r in rows:
            cell = _model_cells(r)
            for t in names:
                score = r["tasks"][t]
                cell[t] = f"{100 * score[metric]:.1f} ± {100 * score.get(metric + '_stderr', 0):.1f}"
            cell["mean"] = f"{100 * sum(r['tasks'][t][metric] for t in names) / len(names):.1f}"
            cells.append(cell)
        tables[f"Zero-shot {metric} (%, ± stderr)"] = table(cells, model_columns + [(t, t) for t in names] + [("mean", "mean")],
                                                            markdown=True)
    return tables


def write_report(folder, results: dict, records: dict) -> list:
    """report.md and the plots into `folder` (results.json is the caller's). Returns the plot paths."""
    from pathlib import Path

    from . import plots

    folder, rows = Path(folder), results["rows"]
    figures = []
    if rows[0].get("perplexity"):
        series = {s: [r["perplexity"].get(s) for r in rows] for s in rows[0]["perplexity"]}
        figures.append(plots.quality_vs_active(rows, series, folder / "ppl_vs_active.png", log_y=True,
                                               ylabel="perplexity (log scale)", title="Perplexity vs FFN active"))
    if rows[0].get("tasks"):
        series = {}
        for task, score in rows[0]["tasks"].items():
            metric = next(m for m in HEADLINE if m in score)
            series[f"{task} ({metric})"] = [100 * r["tasks"][task][metric] for r in rows]
        figures.append(plots.quality_vs_active(rows, series, folder / "accuracy_vs_active.png",
                                               ylabel="zero-shot accuracy (%)", title="Zero-shot accuracy vs FFN active"))
    carved = {name: json.loads(Path(path).read_text())["layers"] for name, path in records.items() if Path(path).exists()}
    profiled = [(name, layers) for name, layers in carved.items() if layers and "activation_rate" in layers[0]]
    if profiled:  # the first carve that profiled activation rates (a sparse carve has none), and one that routes
        name, layers = profiled[0]
        figures.append(plots.activation_rate_histograms(layers, folder / "activation_rates.png",
                                                        title=f"{name}: activation rates of FFN neurons, per layer"))
    routed = [(name, layers) for name, layers in carved.items() if layers and "load_before" in layers[0]]
    if routed:
        name, layers = routed[0]
        figures.append(plots.expert_load_heatmaps(layers, folder / "expert_load.png",
                                                  title=f"{name}: routed expert load on the calibration tokens"))
    plan = results["plan"]
    lines = [f"# cmoe sweep: {plan['model']}", "",
             f"{results['date']}, cmoe {results['cmoe_version']}; calibration {plan['calib']} "
             f"{plan['calib_samples']} x {plan['calib_seqlen']} tokens, seed {plan['seed']}; perplexity seqlen "
             f"{plan['seqlen']}, {'all' if plan['max_windows'] is None else 'first ' + str(plan['max_windows'])} windows.", ""]
    for title, text in report_tables(rows).items():
        lines += [f"## {title}", "", text, ""]
    tasks = list(rows[0].get("tasks", {}))
    times = [dict(model=r["config"] + (" *" if r.get("resumed") else ""), device=r.get("device", "-"),
                  carve=r.get("carve_seconds"), total=r["seconds"], **{t: r["tasks"][t].get("seconds") for t in tasks})
             for r in rows]
    lines += ["## Run time (seconds)", "", table(times, [("model", "model"), ("device", "device"), ("carve", "carve")]
                                                 + [(t, t) for t in tasks] + [("total", "all")], markdown=True), ""]
    if any(r.get("resumed") for r in rows):
        lines += ["\\* resumed from a stopped run: answers the harness had cached then are not timed again.", ""]
    lines += ["FFN compute counted: the multiply-adds each carved FFN ran over the dense FFN's, counted over every "
              "perplexity window (router included).", ""]
    lines += ["## Plots", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    (folder / "report.md").write_text("\n".join(lines))
    return figures


def task_table(scores: dict) -> str:
    """Zero-shot scores as a table (`cmoe eval --tasks`)."""
    def pct(score, key):
        return None if key not in score else f"{100 * score[key]:.1f} ± {100 * score.get(key + '_stderr', 0):.1f}"

    rows = [dict(task=name, acc=pct(s, "acc"), acc_norm=pct(s, "acc_norm"), items=s["items"], seconds=s["seconds"])
            for name, s in scores.items()]
    return table(rows, [("task", "task"), ("acc", "acc %"), ("acc_norm", "acc_norm %"), ("items", "items"),
                        ("seconds", "seconds")])


def bench_table(rows: list[dict]) -> str:
    """`cmoe bench`'s rows as a table: dense, carved, their ratio and the ideal one."""
    cells = []
    for r in rows:
        size = f"{r['tokens']} tokens" if r["mode"] == "prefill" else f"batch {r.get('batch', r.get('tokens'))}"
        if "dense_tok_s" in r:
            dense, carved = f"{r['dense_tok_s']:.1f} tok/s", f"{r['carved_tok_s']:.1f} tok/s"
        else:
            dense, carved = f"{r['dense_ms']:.2f} ms", f"{r['carved_ms']:.2f} ms"
        ideal = r.get("ideal_ratio", r.get("ffn_ideal_ratio"))
        level = "ffn, every layer" if r.get("layers", 1) > 1 else r["level"]
        level += ", CUDA graph" if r.get("cuda_graph") else ""
        cells.append(dict(what=f"{level} {r['mode']}", size=size, dense=dense, carved=carved,
                          ratio=f"{r['ratio']:.2f}x", ideal=f"{ideal:.2f}x" + ("" if r["level"] == "ffn" else " (FFN)")))
        if "dense_kernel_ms" in r:  # carving's own share: the dense FFN through the same decode kernel
            cells.append(dict(cells[-1], what=cells[-1]["what"] + ", dense in cmoe's kernel",
                              dense=f"{r['dense_kernel_ms']:.2f} ms", ratio=f"{r['ratio_same_kernel']:.2f}x"))
    return table(cells, [("what", "measured"), ("size", "size"), ("dense", "dense"), ("carved", "carved"),
                         ("ratio", "dense/carved"), ("ideal", "ideal")])
