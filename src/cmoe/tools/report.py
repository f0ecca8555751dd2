"""Numbers people read: FFN parameter counts and plain-text / markdown tables."""

from __future__ import annotations

import json

from cmoe.hf.adapters import adapter_for
from cmoe.hf.modeling import is_carved
from cmoe.moe.module import MoEFFN
from cmoe.moe.spec import MoESpec


def ffn_parameters(model) -> dict:
    """FFN parameters in all and those a token uses (shared + k routed experts + router), over all layers."""
    adapter = adapter_for(model)
    total = active = 0
    for layer in adapter.layers(model):
        if is_carved(model):
            moe: MoEFFN = adapter.ffn_module(layer)
            layer_total = sum(p.numel() for p in moe.parameters())
            per_expert = 0 if moe.experts is None else (moe.experts.gate_up_proj[0].numel() + moe.experts.down_proj[0].numel())
            routed = 0 if moe.experts is None else moe.experts.gate_up_proj.numel() + moe.experts.down_proj.numel()
            top_k = 0 if moe.router is None else moe.router.top_k
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
    return dict(model=row["config"], preset=row.get("preset", "-"), active=f"{100 * row['active_fraction']:.1f}")


def report_tables(rows: list[dict]) -> dict[str, str]:
    """Markdown tables, one per metric, dense first: {title: table}."""
    model_columns = [("model", "model"), ("preset", "preset"), ("active", "FFN active %")]
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
    carved = [(name, Path(path)) for name, path in records.items() if Path(path).exists()]
    if carved:
        name, path = carved[0]
        layers = json.loads(path.read_text())["layers"]
        figures.append(plots.activation_rate_histograms(layers, folder / "activation_rates.png",
                                                        title=f"{name}: activation rates of FFN neurons, per layer"))
        if layers and "load_before" in layers[0]:
            figures.append(plots.expert_load_heatmaps(layers, folder / "expert_load.png",
                                                      title=f"{name}: routed expert load on the calibration tokens"))
    plan = results["plan"]
    lines = [f"# cmoe sweep: {plan['model']}", "",
             f"{results['date']}, cmoe {results['cmoe_version']}, preset `{plan['preset']}`; calibration {plan['calib']} "
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
    lines += ["## Plots", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    (folder / "report.md").write_text("\n".join(lines))
    return figures


# -- `cmoe inspect` -----------------------------------------------------------------------------------------

def describe(folder) -> dict:
    """What a saved carved model is, read from its config, carve record and router buffers (no model is built)."""
    import re
    from pathlib import Path

    from safetensors import safe_open

    from cmoe.hf.checks import check_carved_folder
    from cmoe.errors import CMoEError

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CMoEError(f"{folder} has no config.json; point inspect at a folder written by cmoe carve.")
    config = check_carved_folder(folder)  # config.json against itself and the weights' headers
    spec = config.get("cmoe")
    if not spec:
        raise CMoEError(f"{folder} holds a dense {config.get('model_type', 'unknown')} model, not a carved one; carve it first.")
    record_file = folder / "carve_record.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else spec.get("record", {})
    buffers: dict[int, dict] = {}
    for weights in sorted(folder.glob("*.safetensors")):
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                match = re.search(r"\.(\d+)\..*router\.(selection_bias|gate_scale)$", key)
                if match:
                    buffers.setdefault(int(match.group(1)), {})[match.group(2)] = f.get_tensor(key).float().tolist()
    spec_fields = MoESpec.from_dict(spec)
    width = spec_fields.expert_width
    layers = []
    for index, layer in enumerate(record.get("layers", [])):
        bias = buffers.get(index, {}).get("selection_bias", layer.get("selection_bias", []))
        scale = buffers.get(index, {}).get("gate_scale", [])
        layers.append(dict(
            layer=index, shared_width=spec_fields.shared * width, routed=spec_fields.routed, expert_width=width,
            top_k=spec_fields.active, kmeans_iterations=layer.get("kmeans_iterations"),
            imbalance_before=layer.get("imbalance_before"), imbalance_after=layer.get("imbalance_after"),
            bias_min=min(bias, default=None), bias_max=max(bias, default=None),
            gate_scale_max=max((abs(s) for s in scale), default=None),
            load_after=[round(v, 4) for v in layer.get("load_after", [])],
            ffn_compute=layer.get("ffn_compute"),
            input_share=layer.get("input_share"), hidden_share=layer.get("hidden_share"),
            completes=layer.get("completes"),
            mean_activation_rate=round(sum(layer["activation_rate"]) / len(layer["activation_rate"]), 4)
            if layer.get("activation_rate") else None,
        ))
    return dict(folder=str(folder), model_type=config.get("model_type"), name=record.get("name"),
                preset=record.get("config", {}).get("preset"), k_act=record.get("k_act"),
                calibration=record.get("calibration"), carve_seconds=record.get("carve_seconds"),
                cmoe_version=record.get("cmoe_version"), hidden_size=spec_fields.hidden_size, expert_width=width,
                shared=spec_fields.shared, active=spec_fields.active, experts=spec_fields.experts,
                active_fraction=round((spec_fields.shared + spec_fields.active) / spec_fields.experts, 4),
                sparse=spec_fields.sparse, complete=spec_fields.complete, output_bias=spec_fields.output_bias,
                budget=record.get("config", {}).get("budget"), router=spec_fields.router,
                dynamic_k=bool(record.get("config", {}).get("dynamic_k")),
                mean_active=record.get("config", {}).get("mean_active") or record.get("config", {}).get("active"),
                ffn_width=record.get("ffn_width"), ffn_compute=record.get("ffn_compute"), layers=layers)


def _routed_per_token(info: dict) -> str:
    if info.get("dynamic_k"):
        return f"{info['mean_active']:g} on average (up to {info['active']})"
    return str(info["active"])


def _compute_line(info: dict) -> str:
    if info.get("ffn_compute") is None:  # carved before cmoe counted it
        return f"  {100 * info['active_fraction']:.1f}% of the carved FFN's neurons run per token"
    budget = "" if info.get("budget") is None else f" (budget {100 * info['budget']:.0f}%)"
    return (f"  FFN compute: {100 * info['ffn_compute']:.1f}% of the dense FFN's multiply-adds per token, router "
            f"included, counted on the calibration tokens{budget}")


def describe_text(info: dict) -> str:
    """`cmoe inspect`'s printout of `describe`."""
    if info.get("sparse"):
        return _describe_sparse(info)
    calibration = info.get("calibration") or {}
    head = [
        f"{info['folder']}: {info['model_type']}, {info['name']} ({info['preset']} preset, cmoe {info['cmoe_version']})",
        f"  experts: {info['shared']} shared + {_routed_per_token(info)} of {info['experts'] - info['shared']} routed per "
        f"token, {info['expert_width']} neurons each, {info['router']} router",
        _compute_line(info),
        f"  calibration: {calibration.get('source', '?')}, {calibration.get('samples', '?')} x {calibration.get('seqlen', '?')} "
        f"tokens; k_act {info['k_act']}; carved in {info['carve_seconds']} s",
        "",
    ]
    rows = []
    for layer in info["layers"]:
        rows.append(dict(
            layer=layer["layer"], shared=layer["shared_width"], routed=f"{layer['routed']} x {layer['expert_width']}",
            k=layer["top_k"], iters=layer["kmeans_iterations"],
            compute=None if layer.get("ffn_compute") is None else f"{100 * layer['ffn_compute']:.1f}",
            imbalance=None if layer["imbalance_before"] is None else
            f"{layer['imbalance_before']:.2f} -> {layer['imbalance_after']:.2f}",
            bias=None if layer["bias_min"] is None else f"{layer['bias_min']:+.3f} .. {layer['bias_max']:+.3f}",
            load=" ".join(f"{100 * v:.0f}" for v in layer["load_after"]) or None,
        ))
    columns = [("layer", "layer"), ("shared", "shared width"), ("routed", "routed experts x width"),
               ("k", "k, most" if info.get("dynamic_k") else "k"),
               ("compute", "FFN compute %"),
               ("iters", "k-means iters"), ("imbalance", "load max/mean before -> after"),
               ("bias", "selection bias min .. max"), ("load", "load per routed expert, % (calibration)")]
    return "\n".join(head) + table(rows, columns)


def _describe_sparse(info: dict) -> str:
    calibration = info.get("calibration") or {}
    head = [
        f"{info['folder']}: {info['model_type']}, {info['name']} ({info['preset']} preset, cmoe {info['cmoe_version']})",
        f"  every one of the {info['expert_width']} neurons kept; per token, gate and up read the input channels above "
        "a threshold and down the neurons above another (activation sparsity, no experts)",
        *(["  layers marked 'completed' finish their kept neurons' sums over every input channel (exact activations; a "
           "second, neuron-major copy of gate and up in every layer)"] if info.get("complete") else []),
        *(["  the mean of what the skipped rows would add on the calibration tokens is folded into an output bias"]
          if info.get("output_bias") else []),
        _compute_line(info),
        f"  calibration: {calibration.get('source', '?')}, {calibration.get('samples', '?')} x {calibration.get('seqlen', '?')} "
        f"tokens; carved in {info['carve_seconds']} s",
        "",
    ]
    rows = [dict(layer=layer["layer"], inputs=_percent(layer.get("input_share")), neurons=_percent(layer.get("hidden_share")),
                 completed="yes" if layer.get("completes") else "no", compute=_percent(layer.get("ffn_compute")))
            for layer in info["layers"]]
    columns = [("layer", "layer"), ("inputs", "input channels read %"), ("neurons", "neurons read by down %"),
               ("completed", "completed"), ("compute", "FFN compute % (calibration)")]
    return "\n".join(head) + table(rows, columns)


def _percent(share):
    return None if share is None else f"{100 * share:.1f}"


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
