// The live dashboard: polls /dashboard/state (coordinator.dashboard) and redraws in place.
/* global SkipCharts */
(function () {
  "use strict";
  const POLL_MS = 2000;
  const charts = {};
  const $ = (id) => document.getElementById(id);

  function text(value) { return value === null || value === undefined ? "–" : String(value); }
  function pct(v) { return v === null || v === undefined ? "–" : (v * 100).toFixed(1) + " %"; }
  function num(v, digits, unit) {
    return v === null || v === undefined ? "–" : v.toFixed(digits) + (unit || "");
  }
  function ago(s) {
    if (s === null || s === undefined) return "never";
    return s < 90 ? Math.round(s) + " s ago" : Math.round(s / 60) + " min ago";
  }
  function cell(row, value, cls) {
    const td = row.insertCell();
    td.textContent = value;
    if (cls) td.className = cls;
    return td;
  }
  function running(d) {
    const r = d.running || {};
    if (r.version !== null && r.version !== undefined) return "v" + r.version + " (" + (r.origin || "fleet") + ")";
    return r.origin || "base model";
  }

  function renderCards(state) {
    const devices = state.devices;
    const online = devices.filter((d) => d.online).length;
    const measured = devices.filter((d) => d.accuracy !== null && d.accuracy !== undefined);
    const mean = measured.length ? measured.reduce((a, d) => a + d.accuracy, 0) / measured.length : null;
    const cards = [
      ["devices online", online + " / " + devices.length],
      ["mean accuracy (measured)", pct(mean)],
      ["runs", state.runs.length],
      ["rounds", state.rounds.length],
      ["promoted", state.rollouts.filter((r) => r.state === "PROMOTED").length],
      ["rolled back", state.rollouts.filter((r) => r.state === "ROLLED_BACK").length],
    ];
    $("cards").replaceChildren(...cards.map(([k, v]) => {
      const div = document.createElement("div");
      div.className = "card";
      div.dataset.card = k;
      div.textContent = k;
      const b = document.createElement("b");
      b.textContent = v;
      div.appendChild(b);
      return div;
    }));
  }

  function renderDevices(devices) {
    const body = $("devices").tBodies[0];
    body.replaceChildren();
    for (const d of devices.slice().sort((a, b) => a.device_id.localeCompare(b.device_id))) {
      const row = body.insertRow();
      row.dataset.device = d.device_id;
      row.dataset.online = d.online ? "yes" : "no";
      cell(row, d.device_id);
      const status = cell(row, d.online ? "online" : "offline");
      const dot = document.createElement("span");
      dot.className = "dot " + (d.online ? "on" : "off");
      status.prepend(dot);
      cell(row, ago(d.seen_seconds_ago), "num");
      cell(row, text(d.cohort));
      cell(row, text(d.cluster));
      cell(row, running(d));
      cell(row, text((d.running || {}).why || d.placed));
      cell(row, pct(d.accuracy), "num");
      cell(row, num(d.confidence_score, 2), "num");
      cell(row, num(d.power_w, 2, " W"), "num");
      cell(row, num(d.energy_j, 1, " J"), "num");
      cell(row, text(d.spool_depth), "num");
    }
  }

  function renderRollouts(rollouts) {
    const body = $("rollouts").tBodies[0];
    body.replaceChildren();
    for (const r of rollouts) {
      const canaries = r.canaries.length ? r.canaries : [{ device: "–" }];
      canaries.forEach((c, i) => {
        const row = body.insertRow();
        row.dataset.rollout = r.rollout_id;
        cell(row, i ? "" : "v" + r.candidate_version + (r.previous_version === null ? " (from base)" : " (from v" + r.previous_version + ")"));
        cell(row, i ? "" : r.cohort + " / " + r.cluster);
        cell(row, i ? "" : r.state.toLowerCase().replace("_", " "), i ? "" : r.state);
        cell(row, c.device);
        cell(row, pct(c.candidate), "num");
        cell(row, pct(c.current), "num");
        cell(row, i ? (c.failure || "") : [r.reason, c.failure].filter(Boolean).join("; "), c.failure ? "fail" : "");
      });
    }
  }

  function renderRounds(rounds) {
    const body = $("rounds").tBodies[0];
    body.replaceChildren();
    for (const r of rounds) {
      const row = body.insertRow();
      row.dataset.round = r.round_id;
      cell(row, r.round_id.slice(0, 8));
      cell(row, SkipCharts.clockLabel(r.started_at));
      cell(row, r.stage.toLowerCase());
      cell(row, text((r.answered || []).length), "num");
      const failures = Object.entries(r.failures || {}).map(([d, why]) => d + ": " + why);
      cell(row, failures.join("; ") || (r.error || ""), failures.length || r.error ? "fail" : "");
    }
  }

  function renderTimeline(events) {
    const list = $("timeline");
    list.replaceChildren(...events.slice().reverse().map((e) => {
      const li = document.createElement("li");
      li.dataset.kind = e.kind;
      const kind = document.createElement("span");
      kind.className = "kind";
      kind.style.color = SkipCharts.EVENT_COLOURS[e.kind] || "#333";
      kind.textContent = SkipCharts.clockLabel(e.t) + " " + e.kind;
      li.append(kind, " " + e.text);
      return li;
    }));
  }

  // per run and cluster: the measured accuracy of each round's aggregate (0: where it started)
  function roundSeries(runs) {
    const series = {};
    for (const run of runs.slice().reverse()) {
      for (const [name, c] of Object.entries(run.clusters)) {
        const points = Object.entries(c.measured || {}).map(([i, m]) => [Number(i), m.accuracy]);
        if (points.length) series["run " + run.run_id.slice(0, 8) + " " + name] = points.sort((a, b) => a[0] - b[0]);
      }
    }
    return series;
  }

  function series(history, what) {
    const out = {};
    for (const [device, by] of Object.entries(history)) if (by[what]) out[device] = by[what];
    return out;
  }

  const TIME_CHARTS = {
    accuracy: { yTitle: "accuracy", percent: true },
    drift: { yTitle: "calibrated score", unit: "" },
    power: { yTitle: "power", unit: "W" },
    spool: { yTitle: "messages", unit: "" },
  };

  function renderCharts(state) {
    const markers = state.events.filter((e) => e.kind !== "round" && e.kind !== "device");
    const names = state.devices.map((d) => d.device_id).sort();
    const times = Object.values(state.history).flatMap((by) => Object.values(by))
      .flatMap((points) => points.map((p) => p[0]));
    const xMin = times.length ? Math.min(...times) : state.now - 60;
    for (const [what, opts] of Object.entries(TIME_CHARTS)) {
      const o = Object.assign({ clock: true, events: markers, names, xMin, xMax: state.now }, opts);
      const data = series(state.history, what);
      if (charts[what]) SkipCharts.updateTimeChart(charts[what], data, o);
      else charts[what] = SkipCharts.timeChart($("chart-" + what), data, o);
    }
    if (charts.rounds) charts.rounds.destroy();
    charts.rounds = SkipCharts.roundChart($("chart-rounds"), roundSeries(state.runs),
      { yTitle: "mean accuracy of the aggregate", xTitle: "round (0: where the run started)", percent: true });
  }

  async function poll() {
    try {
      const response = await fetch("/dashboard/state", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const state = await response.json();
      renderCards(state);
      renderDevices(state.devices);
      renderRollouts(state.rollouts);
      renderRounds(state.rounds);
      renderTimeline(state.events);
      renderCharts(state);
      $("status").className = "";
      $("status").textContent = "updated " + SkipCharts.clockLabel(state.now);
      document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    } catch (err) {
      $("status").className = "error";
      $("status").textContent = "the coordinator does not answer (" + err.message + "); retrying";
    }
    setTimeout(poll, POLL_MS);
  }
  poll();
})();
