"""The simulate report as one self-contained HTML page, with the live dashboard's charts.

Input: the result dictionary `skipfleet simulate --json` writes (see skipfleet/simulate.py).
Chart.js (vendored under coordinator/static/vendor, with its licence), the charts' shared
settings (charts.js) and the report's script are inlined, so the file opens offline, alone.
"""

from __future__ import annotations

import html
import json
import math
import re

from coordinator.dashboard import STATIC_DIR

SCRIPTS = (STATIC_DIR / "vendor" / "chart.umd.min.js", STATIC_DIR / "charts.js")
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;
color:#1f2933} h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem}
.sub{color:#52606d} .cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{border:1px solid #e4e7eb;border-radius:8px;padding:.7rem 1rem;min-width:150px}
.card b{display:block;font-size:1.35rem} table{border-collapse:collapse;width:100%}
th,td{padding:.3rem .5rem;border-bottom:1px solid #e4e7eb;text-align:left;vertical-align:top}
td.num{text-align:right;white-space:nowrap} .wrap{overflow-x:auto}
.chart{position:relative;height:360px;margin:.5rem 0} .chart.short{height:300px}
.PROMOTED{color:#1a7f37;font-weight:600} .ROLLED_BACK{color:#c81e1e;font-weight:600}
"""


def esc(value) -> str:
    return html.escape(str(value))


def _pct(value) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def _num(value, fmt="{:.2f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def _mean(values):
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _chart(name: str, short: bool = False) -> str:
    size = "chart short" if short else "chart"
    return f'<div class="{size}"><canvas id="chart-{name}"></canvas></div>'


def render(result: dict) -> str:
    devices = result["per_device"]
    rounds = sum(r["rounds"] for r in result["runs"])
    cards = [
        ("devices", f"{result['devices']} + {result.get('new_devices', 0)} new without labels"),
        ("runs", len(result["runs"])),
        ("rounds", rounds),
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
        _chart("accuracy"),
        "<h2>What a fine-tune cost each device</h2>",
        _chart("tune", short=True),
        _chart("energy", short=True),
    ]
    if result.get("drift_series"):
        body += [
            "<h2>Label-free drift score over time (calibrated: 1 = the base model's threshold; "
            "dashed lines: the drift, runs, canaries, promotions, rollbacks, faults)</h2>",
            _chart("drift"),
        ]
    if rounds:
        body += ["<h2>Every round: the measured accuracy of each aggregate</h2>", _chart("rounds")]
    body += [
        "<h2>Devices</h2>",
        _device_table(devices),
        "<h2>Runs</h2>",
        _run_table(result),
        "<h2>Canaries: each canary device's accuracy with the candidate and with what it ran</h2>",
        _canary_table(result.get("rollouts") or []),
        "<h2>Timeline (seconds since the agents started)</h2>",
        _timeline_table(result.get("timeline") or []),
    ]
    return (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>skipfleet simulation</title><style>{CSS}</style><body>{''.join(body)}"
        f'<script type="application/json" id="skf-data">{_json_for_script(result)}</script>'
        + "".join(f"<script>{_script(path)}</script>" for path in SCRIPTS)
        + f"<script>{_script(STATIC_DIR / 'report.js')}</script></body></html>\n"
    )


def _script(path) -> str:
    text = path.read_text()
    if "</script" in text.lower():  # would end the inline element early
        raise ValueError(f"{path} cannot be inlined: it contains '</script'")
    return text


def _json_for_script(value) -> str:
    """JSON inside <script>: '<' escaped so no string can close the element."""
    return json.dumps(value).replace("<", "\\u003c")


def _device_table(devices) -> str:
    head = ("device", "what it is", "labels", "cluster", "before", "own fine-tune", "at the end",
            "runs", "why", "tune s", "joules", "bytes sent")  # fmt: skip
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
    head = ("run", "trigger", "rounds", "cluster", "members", "accuracy per round", "outcome",
            "seconds")  # fmt: skip
    rows = [
        (
            r["run"],
            r["trigger"],
            r["rounds"],
            name,
            ", ".join(c["members"]),
            " → ".join(_pct(m["accuracy"]) for _, m in sorted(c["measured"].items(),
                                                             key=lambda kv: int(kv[0]))),
            c["note"],
            _num(r.get("seconds")),
        )
        for r in result["runs"]
        for name, c in r["clusters"].items()
    ]  # fmt: skip
    return _table(head, rows)


def _canary_table(rollouts) -> str:
    if not rollouts:
        return "<p>No canary ran.</p>"
    head = ("version", "cohort / cluster", "decision", "canary device", "candidate", "current",
            "why")  # fmt: skip
    rows = []
    for r in rollouts:
        for i, c in enumerate(r["canaries"]):
            rows.append((
                "" if i else f"v{r['candidate_version']}",
                "" if i else f"{r['cohort']} / {r['cluster']}",
                "" if i else r["state"],
                c["device"],
                _pct(c["candidate"]),
                _pct(c["current"]),
                c["failure"] or ("" if i else r["reason"] or ""),
            ))  # fmt: skip
    return _table(head, rows)


def _timeline_table(events) -> str:
    rows = [(f"{e['t']:.1f}", e["kind"], e["text"]) for e in events]
    return _table(("t (s)", "what", ""), rows)


def _table(head, rows) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join(
        "<tr>" + "".join(f"<td{_cls(c)}>{esc(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f'<div class="wrap"><table><tr>{th}</tr>{trs}</table></div>'


NUMBER = re.compile(r"[–\d.,]+( %)?")


def _cls(cell) -> str:
    if cell in ("PROMOTED", "ROLLED_BACK"):
        return f' class="{cell}"'
    return ' class="num"' if NUMBER.fullmatch(str(cell)) else ""
