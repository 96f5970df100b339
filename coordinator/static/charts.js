// skipfleet's charts: Chart.js (vendored) with the settings the live dashboard and the simulate
// report share, so both read the same way: a legend on every chart, 20 distinct colours (then
// the same colours dashed), time ticks on whole seconds/minutes, units scaled to the data
// (28.9 ms, not 0.0289 s), and every chart sized by its container so nothing is clipped.
/* global Chart */
(function (root) {
  "use strict";

  // Tableau 20, dark and light pairs apart: neighbours in a legend never share a hue.
  const PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
  ];
  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600];
  const MAX_TIME_TICKS = 8;
  const EVENT_COLOURS = {
    fault: "#d62728", rollback: "#d62728", promotion: "#2ca02c", drift: "#ff7f0e",
    canary: "#9467bd", run: "#7f7f7f", round: "#c7c7c7", device: "#8c564b",
  };

  function colour(i) { return PALETTE[i % PALETTE.length]; }
  function dash(i) { return i < PALETTE.length ? [] : [6, 3]; }

  // Units that keep tick labels short: the largest of `units` whose factor keeps the data >= 1.
  const UNITS = {
    s: [["ms", 1e-3], ["s", 1]],
    J: [["mJ", 1e-3], ["J", 1], ["kJ", 1e3]],
    W: [["mW", 1e-3], ["W", 1]],
    B: [["B", 1], ["KiB", 1024], ["MiB", 1048576]],
  };
  function unitFor(base, values) {
    const choices = UNITS[base];
    if (!choices) return { unit: base, factor: 1 };
    const max = Math.max(0, ...values.filter((v) => v !== null && v !== undefined));
    let pick = choices[0];
    for (const c of choices) if (max >= c[1]) pick = c;
    return { unit: pick[0], factor: pick[1] };
  }

  function timeTicks(min, max) {
    const span = Math.max(max - min, 1);
    const step = TIME_STEPS.find((s) => span / s <= MAX_TIME_TICKS) || 86400;
    const ticks = [];
    for (let t = Math.ceil(min / step) * step; t <= max + 1e-9; t += step) ticks.push({ value: t });
    return ticks;
  }
  function clockLabel(t) { // epoch seconds -> HH:MM:SS, the browser's local time
    const d = new Date(t * 1000);
    return [d.getHours(), d.getMinutes(), d.getSeconds()]
      .map((n) => String(n).padStart(2, "0")).join(":");
  }
  function elapsedLabel(t) { // seconds since the start -> "45 s", "2:30"
    const s = Math.round(t);
    if (Math.abs(s) < 60) return s + " s";
    return Math.floor(s / 60) + ":" + String(Math.abs(s) % 60).padStart(2, "0");
  }
  function percent(v) { return Math.round(v * 100) + " %"; }

  // Vertical dashed lines at events ({t, kind, text}); drawn under the lines, labelled on hover
  // in the timeline, and named in the chart's subtitle so the colours are explained.
  const eventLines = {
    id: "skfEvents",
    afterDatasetsDraw(chart, _args, opts) {
      const events = opts.events || [];
      const x = chart.scales.x;
      const area = chart.chartArea;
      const ctx = chart.ctx;
      ctx.save();
      ctx.setLineDash([4, 3]);
      for (const e of events) {
        if (e.t < x.min || e.t > x.max) continue;
        const px = x.getPixelForValue(e.t);
        ctx.strokeStyle = EVENT_COLOURS[e.kind] || "#999";
        ctx.beginPath();
        ctx.moveTo(px, area.top);
        ctx.lineTo(px, area.bottom);
        ctx.stroke();
      }
      ctx.restore();
    },
  };

  function baseOptions(yTitle, xTitle) {
    return {
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      interaction: { mode: "nearest", intersect: false },
      plugins: {
        legend: { position: "top", labels: { boxWidth: 14, boxHeight: 8 } },
        tooltip: { enabled: true },
      },
      scales: {
        x: { title: { display: !!xTitle, text: xTitle } },
        y: { title: { display: !!yTitle, text: yTitle }, beginAtZero: true },
      },
    };
  }

  // series: {name: [[t, value], ...]}; opts: {yTitle, unit (s, J, W, B or a label),
  // percent, clock (epoch seconds on x) or elapsed seconds, events, yMax}
  function timeChart(canvas, series, opts) {
    const chart = new Chart(canvas, {
      type: "line",
      data: { datasets: [] },
      options: baseOptions(opts.yTitle, opts.clock ? "time" : "time since the start"),
      plugins: [eventLines],
    });
    const x = chart.options.scales.x;
    x.type = "linear";
    x.afterBuildTicks = (axis) => { axis.ticks = timeTicks(axis.min, axis.max); };
    x.ticks = { callback: opts.clock ? clockLabel : elapsedLabel, maxRotation: 0 };
    if (opts.percent) {
      chart.options.scales.y.max = 1;
      chart.options.scales.y.ticks = { callback: percent };
    }
    if (opts.yMax !== undefined) chart.options.scales.y.suggestedMax = opts.yMax;
    updateTimeChart(chart, series, opts);
    return chart;
  }

  // opts.names: every series the page shows, so a device has one colour on every chart;
  // opts.xMin, opts.xMax: one time range for charts side by side
  function updateTimeChart(chart, series, opts) {
    const names = Object.keys(series).sort();
    const order = opts.names || names;
    const slot = (name) => Math.max(order.indexOf(name), 0);
    const all = names.flatMap((n) => series[n].map((p) => p[1]));
    const u = opts.percent ? { unit: "", factor: 1 } : unitFor(opts.unit, all);
    chart.data.datasets = names.map((name) => ({
      label: name,
      data: series[name].map((p) => ({ x: p[0], y: p[1] === null ? null : p[1] / u.factor })),
      borderColor: colour(slot(name)),
      backgroundColor: colour(slot(name)),
      borderDash: dash(slot(name)),
      borderWidth: 1.6,
      pointRadius: series[name].length < 40 ? 2.5 : 0,
      spanGaps: false,
    }));
    chart.options.scales.x.min = opts.xMin;
    chart.options.scales.x.max = opts.xMax;
    const y = chart.options.scales.y;
    if (!opts.percent) {
      y.title.text = u.unit && opts.yTitle ? opts.yTitle + " (" + u.unit + ")" : opts.yTitle;
    }
    chart.options.plugins.skfEvents = { events: opts.events || [] };
    chart.update("none");
  }

  // Grouped bars: categories on x (all shown, rotated if they must be), one series per group.
  // series: {name: [value or null per category]}; opts: {yTitle, unit, percent}
  function barChart(canvas, categories, series, opts) {
    const names = Object.keys(series);
    const all = names.flatMap((n) => series[n]);
    const u = opts.percent ? { unit: "", factor: 1 } : unitFor(opts.unit, all);
    const options = baseOptions(
      u.unit && opts.yTitle ? opts.yTitle + " (" + u.unit + ")" : opts.yTitle, "");
    options.scales.x.ticks = { autoSkip: false, maxRotation: 60, minRotation: 0 };
    options.interaction = { mode: "index", intersect: false };
    if (opts.percent) {
      options.scales.y.max = 1;
      options.scales.y.ticks = { callback: percent };
    }
    return new Chart(canvas, {
      type: "bar",
      data: {
        labels: categories,
        datasets: names.map((name, i) => ({
          label: name,
          data: series[name].map((v) => (v === null || v === undefined ? null : v / u.factor)),
          backgroundColor: colour(i),
        })),
      },
      options: options,
    });
  }

  // Lines over a whole-number x (rounds): series {name: [[x, y], ...]}
  function roundChart(canvas, series, opts) {
    const names = Object.keys(series);
    const options = baseOptions(opts.yTitle, opts.xTitle);
    options.scales.x.type = "linear";
    options.scales.x.ticks = { stepSize: 1, precision: 0 };
    if (opts.percent) {
      options.scales.y.max = 1;
      options.scales.y.ticks = { callback: percent };
    }
    return new Chart(canvas, {
      type: "line",
      data: {
        datasets: names.map((name, i) => ({
          label: name,
          data: series[name].map((p) => ({ x: p[0], y: p[1] })),
          borderColor: colour(i),
          backgroundColor: colour(i),
          borderDash: dash(i),
          pointRadius: 3,
        })),
      },
      options: options,
    });
  }

  root.SkipCharts = {
    PALETTE, EVENT_COLOURS, colour, unitFor, timeTicks, clockLabel, elapsedLabel, percent,
    timeChart, updateTimeChart, barChart, roundChart,
  };
})(typeof window !== "undefined" ? window : this);
