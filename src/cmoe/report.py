"""Numbers people read: FFN parameter counts and plain-text / markdown tables."""

from __future__ import annotations

from .adapters import adapter_for
from .modeling import is_carved
from .moe import MoEFFN


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
