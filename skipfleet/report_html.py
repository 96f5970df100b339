"""The simulate report as one self-contained HTML page: plain SVG charts, no dependency.

Input: the result dictionary `skipfleet simulate --json` writes (see skipfleet/simulate.py).
"""

from __future__ import annotations

import html
import math

PALETTE = ("#9aa5b1", "#2f80ed", "#27ae60", "#f2994a", "#eb5757", "#9b51e0")
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2933}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem}
.sub{color:#52606d} .cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{border:1px solid #e4e7eb;border-radius:8px;padding:.7rem 1rem;min-width:150px}
.card b{display:block;font-size:1.35rem} table{border-collapse:collapse;width:100%}
th,td{padding:.3rem .5rem;border-bottom:1px solid #e4e7eb;text-align:right}
th:first-child,td:first-child{text-align:left} svg text{font:12px system-ui,sans-serif}
"""


def esc(value) -> str:
    return html.escape(str(value))


def _legend(names, x, y) -> str:
    parts = []
    for i, name in enumerate(names):
        cx = x + i * 170
        parts.append(
            f'<rect x="{cx}" y="{y - 10}" width="12" height="12" '
            f'fill="{PALETTE[i % len(PALETTE)]}"/>'
            f'<text x="{cx + 18}" y="{y}">{esc(name)}</text>'
        )
    return "".join(parts)


def bar_chart(
    categories, series: dict[str, list], *, title, unit="", ymax=None, percent=False
) -> str:
    """Grouped bars: one group per category, one bar per series (None = no bar)."""
    width, height, left, bottom, top = 1060, 320, 60, 110, 40
    values = [v for vs in series.values() for v in vs if v is not None]
    ymax = ymax or (max(values) * 1.1 if values else 1.0) or 1.0
    plot_w, plot_h = width - left - 120, height - top - bottom  # room for the last label
    group_w = plot_w / max(len(categories), 1)
    bar_w = group_w * 0.8 / max(len(series), 1)
    out = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">']
    for tick in range(5):
        value = ymax * tick / 4
        y = top + plot_h - plot_h * tick / 4
        label = f"{value * 100:.0f} %" if percent else f"{value:.3g}{unit}"
        out.append(
            f'<line x1="{left}" x2="{width - 20}" y1="{y}" y2="{y}" stroke="#e4e7eb"/>'
            f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{label}</text>'
        )
    for g, category in enumerate(categories):
        x0 = left + g * group_w + group_w * 0.1
        for s, (name, vs) in enumerate(series.items()):
            value = vs[g]
            if value is None:
                continue
            h = plot_h * min(value / ymax, 1.0)
            shown = f"{value * 100:.1f} %" if percent else f"{value:.3g}{unit}"
            out.append(
                f'<rect x="{x0 + s * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" '
                f'height="{h:.1f}" fill="{PALETTE[s % len(PALETTE)]}">'
                f"<title>{esc(category)}, {esc(name)}: {shown}</title></rect>"
            )
        cx = left + g * group_w + group_w / 2
        out.append(
            f'<text transform="translate({cx:.1f},{top + plot_h + 12}) rotate(35)">'
            f"{esc(category)}</text>"
        )
    out.append(_legend(series, left, 20))
    out.append("</svg>")
    return "".join(out)


def line_chart(
    lines: dict[str, list[tuple[float, float]]], *, title, events=(), xlabel="seconds", ylabel=""
) -> str:
    """One polyline per series of (x, y) points; vertical markers for (x, label) events."""
    width, height, left, bottom, top = 1060, 300, 60, 40, 40
    points = [p for pts in lines.values() for p in pts]
    if not points:
        return ""
    xmax = max(max(x for x, _ in points), *(x for x, _ in events), 1e-9)
    ymax = max(y for _, y in points) * 1.1 or 1.0
    plot_w, plot_h = width - left - 20, height - top - bottom

    def sx(x):
        return left + plot_w * x / xmax

    def sy(y):
        return top + plot_h - plot_h * min(y / ymax, 1.0)

    out = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">']
    for tick in range(5):
        y = ymax * tick / 4
        out.append(
            f'<line x1="{left}" x2="{width - 20}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
            f'stroke="#e4e7eb"/><text x="{left - 6}" y="{sy(y) + 4:.1f}" '
            f'text-anchor="end">{y:.3g}</text>'
        )
    for tick in range(6):  # the time axis
        x = xmax * tick / 5
        out.append(
            f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{x:.0f}</text>'
        )
    for x, label in events:
        out.append(
            f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{top + plot_h}" '
            f'stroke="#eb5757" stroke-dasharray="4 3"/><text x="{sx(x) + 3:.1f}" '
            f'y="{top + 12}" fill="#eb5757">{esc(label)}</text>'
        )
    for i, (name, pts) in enumerate(lines.items()):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        color = PALETTE[i % len(PALETTE)]
        out.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6">'
            f"<title>{esc(name)}</title></polyline>"
        )
    if len(lines) <= len(PALETTE):  # beyond that the legend would crowd: hover a line instead
        out.append(_legend(lines, left + 120, 20))
    out.append(f'<text x="{width - 20}" y="{height - 8}" text-anchor="end">{esc(xlabel)}</text>')
    out.append(f'<text x="{left}" y="{top - 8}">{esc(ylabel)}</text></svg>')
    return "".join(out)


def _pct(value) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def _num(value, fmt="{:.2f}") -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else fmt.format(value)
    )


def render(result: dict) -> str:
    devices = result["per_device"]
    names = [d["device"] for d in devices]
    cards = [
        ("devices", f"{result['devices']} + {result.get('new_devices', 0)} new without labels"),
        ("runs", len(result["runs"])),
        ("rounds", sum(r["rounds"] for r in result["runs"])),
        ("mean accuracy before", _pct(_mean(d["accuracy_initial"] for d in devices))),
        ("mean accuracy at the end", _pct(_mean(d["accuracy_end"] for d in devices))),
        ("fine-tune energy", f"{sum(d['joules'] or 0 for d in devices):.2f} J"),
        ("bytes sent by devices", f"{sum(d['bytes_sent'] or 0 for d in devices):,}"),
    ]
    body = [
        f"<h1>skipfleet simulation: {esc(result['dataset'])}</h1>",
        f'<p class="sub">{esc(result.get("description", ""))}</p>',
        '<div class="cards">'
        + "".join(f"<div class=card>{esc(k)}<b>{esc(v)}</b></div>" for k, v in cards)
        + "</div>",
        "<h2>Accuracy of each device (own hold-out; devices without labels: the simulation's "
        "labels)</h2>",
        bar_chart(
            names,
            {
                "before any fine-tune": [d["accuracy_initial"] for d in devices],
                "after its own fine-tune": [d["accuracy_own"] for d in devices],
                "running at the end": [d["accuracy_end"] for d in devices],
            },
            title="accuracy per device",
            ymax=1.0,
            percent=True,
        ),
        "<h2>What a fine-tune cost each device</h2>",
        bar_chart(
            names,
            {"fine-tune seconds": [d["finetune_seconds"] for d in devices]},
            title="fine-tune seconds",
            unit=" s",
        ),
        bar_chart(names, {"joules": [d["joules"] for d in devices]}, title="energy", unit=" J"),
    ]
    drift = result.get("drift_series") or {}
    if drift:
        events = [(e["t"], e["event"]) for e in result.get("timeline", [])]
        body += [
            "<h2>Label-free drift score over time (calibrated: 1 = the base model's threshold)"
            "</h2>",
            line_chart(drift, title="drift score", events=events, ylabel="confidence score"),
        ]
    body += ["<h2>Devices</h2>", _device_table(devices), "<h2>Runs</h2>", _run_table(result)]
    return (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>skipfleet simulation"
        f"</title><style>{CSS}</style><body>{''.join(body)}</body></html>\n"
    )


def _mean(values):
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _device_table(devices) -> str:
    head = (
        "device",
        "what it is",
        "labels",
        "cluster",
        "before",
        "own fine-tune",
        "at the end",
        "runs",
        "why",
        "tune s",
        "joules",
        "bytes sent",
    )
    rows = [
        (
            d["device"],
            d.get("description", ""),
            "yes" if d.get("labelled", True) else "no",
            d.get("cluster") or "–",
            _pct(d["accuracy_initial"]),
            _pct(d["accuracy_own"]),
            _pct(d["accuracy_end"]),
            d.get("runs", "–"),
            d.get("why", ""),
            _num(d["finetune_seconds"], "{:.3f}"),
            _num(d["joules"]),
            _num(d["bytes_sent"], "{:,}"),
        )
        for d in devices
    ]
    return _table(head, rows)


def _run_table(result) -> str:
    head = ("run", "trigger", "rounds", "cluster", "members", "outcome", "seconds")
    rows = [
        (
            r["run"],
            r["trigger"],
            r["rounds"],
            name,
            ", ".join(c["members"]),
            c["note"],
            _num(r.get("seconds")),
        )
        for r in result["runs"]
        for name, c in r["clusters"].items()
    ]
    return _table(head, rows)


def _table(head, rows) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"
