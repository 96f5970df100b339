"""Metric and label names in PromQL expressions, and the metric table of docs/architecture.md.

A small tokenizer, not a full PromQL parser (promtool checks syntax): enough to list which series
a dashboard reads, so tests can hold every expression to the documented metric names and labels,
and later to what the running coordinator exports. Grafana variables ($__rate_interval, $device,
${device}) are accepted where PromQL allows a duration or a string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# PromQL functions, aggregation operators and the @ modifiers start()/end() (Prometheus 2.x). An
# identifier followed by "(" must be one of these, so a misspelt function fails loudly instead of
# passing as a metric name.
FUNCTIONS = frozenset((
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "hour", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln",
    "log10", "log2", "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round",
    "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc", "sort_desc",
    "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time",
    "timestamp", "vector", "year", "start", "end"
))  # fmt: skip
# Aggregation operators may put their `by (...)`/`without (...)` clause before the parenthesis.
AGGREGATIONS = frozenset((
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio"
))  # fmt: skip
# Keywords that are never metric names; these six may take a parenthesised label list.
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = LABEL_LIST_KEYWORDS | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
IMPLICIT_LABELS = frozenset({"job", "instance", "le"})

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+)
  | (?P<number>0x[0-9a-fA-F]+
      | (?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@:])
    """,
    re.VERBOSE,
)


class PromQLTokenError(ValueError):
    pass


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise PromQLTokenError(f"cannot tokenize {expr[pos : pos + 20]!r} in {expr!r}")
        if match.lastgroup != "space":
            out.append((match.lastgroup, match.group()))
        pos = match.end()
    return out


@dataclass(frozen=True)
class Names:
    metrics: frozenset[str]
    labels: frozenset[str]  # in matchers, by/without/on/ignoring/group_* lists


def promql_names(expr: str) -> Names:
    """The metric and label names `expr` refers to."""
    tokens = _tokens(expr)
    metrics: set[str] = set()
    labels: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        word = text.lower()  # keywords and aggregation operators are case-insensitive
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if text == "{":  # label matchers: `name op "value"`, comma separated
            i += 1
            while i < len(tokens) and tokens[i][1] != "}":
                if tokens[i][0] == "ident" and i + 1 < len(tokens) and tokens[i + 1][0] == "op":
                    labels.add(tokens[i][1])
                i += 1
        elif text == "[":  # range or subquery: durations and variables only
            while i < len(tokens) and tokens[i][1] != "]":
                i += 1
        elif kind == "ident" and word in LABEL_LIST_KEYWORDS and following == "(":
            i += 2
            while i < len(tokens) and tokens[i][1] != ")":
                if tokens[i][0] == "ident":
                    labels.add(tokens[i][1])
                i += 1
        elif kind == "ident" and word in AGGREGATIONS:
            if following is None or following.lower() not in ("(", "by", "without"):
                raise PromQLTokenError(
                    f"{text!r} is an aggregation operator, not a metric: {expr!r}"
                )
        elif kind == "ident" and following == "(":
            if word not in FUNCTIONS:
                raise PromQLTokenError(f"unknown PromQL function {text!r} in {expr!r}")
        elif kind == "ident" and word not in KEYWORDS:
            metrics.add(text)
        i += 1
    if "__name__" in labels:
        raise PromQLTokenError(f"select metrics by name, not by __name__: {expr!r}")
    return Names(frozenset(metrics), frozenset(labels))


def promql_metric_names(expr: str) -> frozenset[str]:
    """The metric names `expr` reads, e.g. {"skipfleet_rounds_total"}."""
    return promql_names(expr).metrics


# -- the documented metrics --------------------------------------------------------------------
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True)
class Metric:
    name: str
    type: str  # gauge, counter, histogram
    labels: frozenset[str]

    def exposed_names(self) -> frozenset[str]:
        """The series names Prometheus stores for this metric."""
        if self.type == "histogram":
            return frozenset(self.name + suffix for suffix in HISTOGRAM_SUFFIXES)
        return frozenset({self.name})


def documented_metrics(architecture_md: Path) -> dict[str, Metric]:
    """The table under "## Prometheus metrics" in docs/architecture.md, by name."""
    text = architecture_md.read_text()
    section = text.split("## Prometheus metrics", 1)[1].split("\n## ", 1)[0]
    metrics = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        name = cells[0].strip("`")
        kind = cells[1].split()[0]
        labels = frozenset(re.findall(r"`([a-z_]+)`", cells[2]))
        metrics[name] = Metric(name, kind, labels)
    return metrics
