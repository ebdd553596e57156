"""The Grafana dashboard only queries metrics Tandem exports.

The exported names come from the code itself: the ingress's metric objects
(routing/metrics.py) and a worker's registry (workers/metrics.py), with the sample suffixes
prometheus_client adds per type. A renamed metric then fails here instead of leaving an
empty panel in production.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

import routing.metrics as ingress_metrics
from control_plane.planner import metrics as planner_metrics
from workers.metrics import WorkerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "tandem" / "dashboards" / "tandem.json"

# vLLM's own metric names (vllm:*) the dashboard may use once the workers pass them through.
# Empty today: no vLLM metric is exported, so no panel may query one.
VLLM_PASSTHROUGH_METRICS: frozenset[str] = frozenset()

# The series prometheus_client writes for a metric family, by type.
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}

_PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
}  # fmt: skip


def _families() -> list[tuple[str, str]]:
    """(family name, type) of every metric the ingress and a worker export."""
    families = []
    for value in vars(ingress_metrics).values():
        if isinstance(value, MetricWrapperBase):
            families.extend((family.name, family.type) for family in value.describe())
    worker = WorkerMetrics("prefill", "test-replica")
    families.extend((family.name, family.type) for family in worker.registry.collect())
    families.extend((family.name, family.type) for family in planner_metrics.exported_families())
    return families


def exported_series_names() -> set[str]:
    names = {
        name + suffix
        for name, kind in _families()
        for suffix in _SAMPLE_SUFFIXES.get(kind, ("",))
    }
    return names | set(VLLM_PASSTHROUGH_METRICS)


def _histogram_bounds() -> dict[str, set[str]]:
    """The `le` label values of each ingress histogram's buckets, as Prometheus sees them."""
    bounds = {}
    for value in vars(ingress_metrics).values():
        if isinstance(value, Histogram):
            # _upper_bounds is the parent's bucket list; prometheus_client has no public view.
            bounds[value._name] = {floatToGoString(bound) for bound in value._upper_bounds}
    return bounds


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left after removing strings, label
    matchers, ranges, grouping clauses, function calls and keywords."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", stripped
    )
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
        rest = stripped[match.end():]
        if re.match(r"\s*\(", rest) or match.group(0) in _PROMQL_KEYWORDS:
            continue  # a function call or an operator keyword
        names.add(match.group(0))
    return names


def _panels(node: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    found = []
    for panel in node.get("panels", []):
        found.append(panel)
        found.extend(_panels(panel))
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_series_names()


def test_metric_name_extraction():
    expr = (
        'histogram_quantile(0.99, sum by (le, pool) (rate(tandem:kv_transfer_seconds_bucket'
        '{link=~"a:1->b:2", codec="identity"}[$__rate_interval]))) / '
        "sum(rate(tandem:requests_total[5m] offset 1h)) * 1e3 and on (pool) up"
    )
    assert metric_names(expr) == {"tandem:kv_transfer_seconds_bucket", "tandem:requests_total", "up"}


def test_exported_names_come_from_the_code(exported: set[str]):
    # Counters gain _total, histograms _bucket/_count/_sum: what Prometheus stores.
    assert "tandem:requests_total" in exported
    assert "tandem:time_to_first_token_seconds_bucket" in exported
    assert "tandem:time_per_output_token_seconds_bucket" in exported
    assert "tandem:kv_transfer_bytes_total" in exported
    assert "tandem:engine_kv_cache_usage" in exported
    assert "tandem:requests" not in exported


def test_every_panel_queries_exported_metrics(dashboard: dict[str, Any], exported: set[str]):
    panels = [panel for panel in _panels(dashboard) if panel["type"] != "row"]
    assert len(panels) >= 15
    unknown = {}
    for panel in panels:
        exprs = [target.get("expr", "") for target in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no PromQL query"
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"panel {panel['title']!r}: no metric in {expr!r}"
            missing = names - exported
            if missing:
                unknown[panel["title"]] = sorted(missing)
    assert not unknown, f"panels query metrics Tandem does not export: {unknown}"


def test_template_variable_queries_use_exported_metrics(dashboard: dict[str, Any], exported: set[str]):
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\(([^,]+),\s*\w+\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        assert match.group(1).strip() in exported


def test_slo_targets_are_bucket_bounds(dashboard: dict[str, Any]):
    """SLO attainment reads one histogram bucket (le="$ttft_slo"), so every target offered
    must be a bucket bound of that histogram, written the way Prometheus writes it."""
    bounds = _histogram_bounds()
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    checked = 0
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            for metric, variable in re.findall(r'([\w:]+)_bucket\{[^}]*le="\$(\w+)"', target["expr"]):
                options = {option["value"] for option in variables[variable]["options"]}
                assert options <= bounds[metric], (metric, sorted(options - bounds[metric]))
                assert variables[variable]["current"]["value"] in options
                checked += 1
    assert checked >= 2


def test_dashboard_covers_the_issue_views(dashboard: dict[str, Any]):
    exprs = " ".join(
        target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])
    )
    for needed in (
        "tandem:time_to_first_token_seconds_bucket",  # TTFT percentiles + SLO
        "tandem:time_per_output_token_seconds_bucket",  # TPOT percentiles + SLO
        "tandem:requests_total",  # throughput, errors
        'tandem:kv_transfer_bytes_total{stage="raw"}',  # KV goodput, compression ratio
        'reason="affinity"',  # router hit rate
        "tandem:router_in_flight_requests",  # per-replica load
        "tandem:engine_kv_cache_usage",
        "tandem:planner_target_replicas",  # the P:D planner's view
        "tandem:planner_decisions_total",
    ):
        assert needed in exprs, needed


def test_dashboard_is_grafana_importable(dashboard: dict[str, Any]):
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            # Every query goes to the datasource picked in the dashboard's variable.
            assert panel["datasource"]["uid"] == "${datasource}"
