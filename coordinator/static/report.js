// The simulate report's charts (skipfleet/report_html.py inlines this file, charts.js and
// Chart.js, with the result as JSON in #skf-data, so the page stands alone offline).
/* global SkipCharts */
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("skf-data").textContent);
  const $ = (id) => document.getElementById(id);
  const devices = data.per_device;
  const names = devices.map((d) => d.device);
  const column = (key) => devices.map((d) => d[key]);

  SkipCharts.barChart($("chart-accuracy"), names, {
    "before any fine-tune": column("accuracy_initial"),
    "after its own fine-tune": column("accuracy_own"),
    "running at the end": column("accuracy_end"),
  }, { yTitle: "accuracy", percent: true });
  SkipCharts.barChart($("chart-tune"), names, { "fine-tune time": column("finetune_seconds") },
    { yTitle: "fine-tune time", unit: "s" });
  SkipCharts.barChart($("chart-energy"), names, { "fine-tune energy": column("joules") },
    { yTitle: "energy", unit: "J" });

  const markers = (data.timeline || []).filter((e) => e.kind !== "round");
  if ($("chart-drift")) {
    // From the start to the scenario's last heartbeat or event: a marker after the last
    // heartbeat (a promotion, often) was drawn outside the axis, i.e. not at all.
    const drift = data.drift_series || {};
    const times = Object.values(drift).flatMap((s) => s.map((p) => p[0]))
      .concat(markers.map((e) => e.t));
    SkipCharts.timeChart($("chart-drift"), drift, {
      yTitle: "calibrated score", unit: "", events: markers,
      xMin: 0, xMax: times.length ? Math.max(...times) : undefined,
    });
  }

  // every round of every run: the measured accuracy of each aggregate (0: where it started)
  const rounds = {};
  for (const run of data.runs) {
    for (const [name, c] of Object.entries(run.clusters)) {
      const points = Object.entries(c.measured || {}).map(([i, m]) => [Number(i), m.accuracy]);
      if (points.length) rounds["run " + run.run.slice(0, 8) + " " + name] = points.sort((a, b) => a[0] - b[0]);
    }
  }
  if ($("chart-rounds")) {
    SkipCharts.roundChart($("chart-rounds"), rounds, {
      yTitle: "mean accuracy of the aggregate", xTitle: "round (0: where the run started)", percent: true,
    });
  }
  document.body.dataset.charts = "drawn";
})();
