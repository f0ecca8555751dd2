"""The report's figures (matplotlib, PNG): quality vs fraction of FFN active, activation rates, expert loads."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

PLAIN = FuncFormatter(lambda value, _: f"{value:,.4g}")  # 2,500 rather than 2.5 x 10^3 on log axes

SIZE = (8, 5)  # inches; at DPI this is 1200 x 750 pixels
DPI = 150


def _finish(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _label_points(ax, xs, ys, labels):
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)


def quality_vs_active(rows: list[dict], series: dict[str, list[float | None]], path: Path, *, ylabel: str,
                      title: str, log_y: bool = False, dense_lines: bool = True) -> Path:
    """One line per series (a data set or task) against the FFN compute counted as the model ran (or, where it was
    not counted, the % of FFN parameters each token can use)."""
    fig, ax = plt.subplots(figsize=SIZE)
    x = [row.get("ffn_compute") or row["active_fraction"] for row in rows]  # counted where it was
    order = sorted(range(len(rows)), key=lambda i: x[i])
    xs = [100 * x[i] for i in order]
    for name, values in series.items():
        points = [(x, values[i], rows[i]["config"]) for x, i in zip(xs, order) if values[i] is not None]
        if not points:
            continue
        line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)[0]
        if dense_lines and rows[0]["config"] == "dense" and values[0] is not None:
            ax.axhline(values[0], color=line.get_color(), linestyle=":", linewidth=1)
        if len(series) <= 2:  # few lines: name each point; more: name the configurations once, on top
            _label_points(ax, [p[0] for p in points], [p[1] for p in points], [p[2] for p in points])
    if len(series) > 2:
        _name_configurations_on_top(ax, xs, [rows[i]["config"] for i in order])
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PLAIN)
        ax.yaxis.set_minor_formatter(PLAIN)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    counted = all(row.get("ffn_compute") is not None for row in rows)
    ax.set_xlabel("FFN compute counted (% of dense)" if counted else "FFN parameters active per token (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=9)
    return _finish(fig, path)


def _name_configurations_on_top(ax, xs: list[float], names: list[str]) -> None:
    at: dict[float, list[str]] = {}
    for x, name in sorted(zip(xs, names)):
        # configurations within a point of each other (S1A1E8 and S2A2E16: 25.3% and 25.6%) share a tick
        near = next((tick for tick in at if abs(tick - x) < 1.0), x)
        if name not in at.setdefault(near, []):
            at[near].append(name)
    top = ax.secondary_xaxis("top")
    top.set_xticks(list(at), [" / ".join(n) for n in at.values()], fontsize=8)


def activation_rate_histograms(layers: list[dict], path: Path, *, title: str, panels: int = 8) -> Path:
    """The paper's Figure 3: per layer, how many neurons have each activation rate; shared neurons shaded."""
    count = min(panels, len(layers))
    picked = sorted({round(i * (len(layers) - 1) / max(count - 1, 1)) for i in range(count)})
    columns = min(4, len(picked))
    rows = -(-len(picked) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.8 * rows + 0.6), squeeze=False, sharex=True)
    for ax in axes.flat[len(picked):]:
        ax.axis("off")
    for ax, index in zip(axes.flat, picked):
        rate = [100 * r for r in layers[index]["activation_rate"]]
        shared = set(layers[index]["shared_neurons"])
        routed_rates = [r for i, r in enumerate(rate) if i not in shared]
        shared_rates = [r for i, r in enumerate(rate) if i in shared]
        bins = 40
        top = max(rate) or 1.0
        edges = [top * b / bins for b in range(bins + 1)]
        ax.hist([routed_rates, shared_rates], bins=edges, stacked=True, color=["tab:blue", "tab:orange"],
                label=["routed neurons", "shared neurons"])
        if shared_rates:
            ax.axvline(min(shared_rates), color="black", linestyle="--", linewidth=0.8,
                       label="lowest shared rate")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PLAIN)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
        ax.set_title(f"layer {index}", fontsize=10)
        ax.set_xlabel("activation rate (% of tokens)", fontsize=8)
        ax.set_ylabel("neurons", fontsize=8)
        ax.tick_params(labelsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    return _finish(fig, path)


def expert_load_heatmaps(layers: list[dict], path: Path, *, title: str) -> Path:
    """Routed experts' share of the routed work, per layer, before and after setting the selection bias."""
    before = [[100 * v for v in layer["load_before"]] for layer in layers if "load_before" in layer]
    after = [[100 * v for v in layer["load_after"]] for layer in layers if "load_after" in layer]
    fig, axes = plt.subplots(1, 2, figsize=(11, max(4, 0.18 * len(before) + 2)), sharey=True)
    high = max(max(map(max, before)), max(map(max, after)))
    for ax, loads, name in zip(axes, (before, after), ("before balancing", "after balancing")):
        image = ax.imshow(loads, aspect="auto", cmap="viridis", vmin=0, vmax=high, interpolation="nearest")
        worst = max(max(row) / (sum(row) / len(row)) for row in loads)
        ax.set_title(f"{name} (worst max/mean {worst:.2f})", fontsize=10)
        ax.set_xlabel("routed expert")
        ax.set_xticks(range(len(loads[0])))
    axes[0].set_ylabel("layer")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes, label="share of routed assignments (%)", shrink=0.9)
    fig.suptitle(title)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path
