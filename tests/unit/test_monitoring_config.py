"""deploy/prometheus and deploy/grafana: valid for promtool, and only name metrics Berth exports.

The metric catalog (tests/unit/metric_catalog.py) is the contract between the exporters and this
config: a dashboard or alert naming a metric, label or type the catalog does not have fails here.
PromQL is parsed by promtool (Debian package ``prometheus``); those tests skip when it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.metric_catalog import HELP, HISTOGRAM_SUFFIXES, METRICS, TARGET_LABELS, series_names

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST_YML = DEPLOY / "prometheus" / "alerts_test.yml"
DATASOURCE_YML = DEPLOY / "grafana" / "provisioning" / "datasources" / "berth.yml"
DASHBOARD_PROVIDER_YML = DEPLOY / "grafana" / "provisioning" / "dashboards" / "berth.yml"
DASHBOARDS = {
    "berth-cluster": DEPLOY / "grafana" / "dashboards" / "berth-cluster.json",
    "berth-service": DEPLOY / "grafana" / "dashboards" / "berth-service.json",
    "berth-node": DEPLOY / "grafana" / "dashboards" / "berth-node.json",
}
DATASOURCE_UID = "berth-prometheus"
ALERTS = {
    "BerthServiceBelowCount",
    "BerthNodeDown",
    "BerthTasksPending",
    "BerthFailoverSlow",
    "BerthControllerDown",
}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found on PATH (Debian package `prometheus`; CI installs it)"
)

# Series Prometheus itself produces for every target, besides what the exporters export.
SYNTHETIC_SERIES = {"up": ("instance", "job")}
KNOWN_SERIES: dict[str, str] = {**series_names(), **{name: name for name in SYNTHETIC_SERIES}}
ALL_LABELS = {label for _, labels in METRICS.values() for label in labels} | set(TARGET_LABELS) | {"le"}

# Values for Grafana's variables when an expression is handed to promtool.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__range": "1h", "__interval": "30s"}
EXAMPLE_VALUES = {"service": "web", "node": "node-1", "task": "t-1"}


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def assert_promtool_ok(*args: str | Path) -> None:
    result = run_promtool(*args)
    assert result.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{result.stdout}{result.stderr}"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --- PromQL helpers ---------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE)
# Not preceded by a word character or dot, so the unit of a duration (5m) or exponent (1e3) is skipped.
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_COUNTER_FUNCTION_ARG = re.compile(r"\b(?:rate|irate|increase|resets)\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_KEYWORDS |= {"offset", "atan2", "inf", "nan"}
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def strip_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (identifiers that are no function, keyword or label)."""
    text = strip_strings(expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """``(metric name, label names in its matchers)`` for each selector with matchers."""
    return [
        (m.group(1) or "", set(_MATCHER_LABEL.findall(m.group(2))))
        for m in _SELECTOR.finditer(strip_strings(expr))
    ]


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in _GROUPING.findall(strip_strings(expr)):
        labels.update(label.strip() for label in group.split(",") if label.strip())
    return labels


def substitute(expr: str, variables: set[str]) -> str:
    """Replaces Grafana variables with concrete values; fails on a variable the dashboard lacks."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        assert name in variables, f"${name} is neither a Grafana builtin nor a dashboard variable: {expr}"
        return EXAMPLE_VALUES.get(name, "x")

    return _VARIABLE.sub(value, expr)


def label_sets(name: str) -> set[str]:
    family = KNOWN_SERIES[name]
    if family in SYNTHETIC_SERIES:
        return set(SYNTHETIC_SERIES[family])
    labels = set(METRICS[family][1]) | set(TARGET_LABELS)
    return labels | {"le"} if name.endswith("_bucket") else labels


def is_counter_like(name: str) -> bool:
    """A counter, or a histogram's _bucket/_sum/_count series: what rate() and increase() take."""
    family = KNOWN_SERIES[name]
    kind = METRICS[family][0] if family in METRICS else "gauge"
    return kind == "counter" or (kind == "histogram" and name != family)


# --- dashboards -------------------------------------------------------------------------------------


def load_dashboard(uid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARDS[uid].read_text())
    return data


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))  # collapsed rows nest their panels


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in iter_panels(dashboard["panels"]) if p.get("type") != "row"]


def dashboard_variables(dashboard: dict[str, Any]) -> set[str]:
    return {v["name"] for v in dashboard.get("templating", {}).get("list", [])}


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, expr)`` for every target of every panel."""
    return [
        (f"panel {panel['id']} ({panel.get('title')!r}) target {target.get('refId')}", target["expr"])
        for panel in query_panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"] if "alert" in rule]


def all_exprs() -> list[tuple[str, str, frozenset[str]]]:
    """``(where, expr, the dashboard's variables)`` for every alert and dashboard expression."""
    exprs = [(f"alert {rule['alert']}", str(rule["expr"]), frozenset[str]()) for rule in alert_rules()]
    for uid in DASHBOARDS:
        dashboard = load_dashboard(uid)
        variables = frozenset(dashboard_variables(dashboard))
        exprs += [(f"{uid} {where}", expr, variables) for where, expr in dashboard_exprs(dashboard)]
    return exprs


# --- the catalog ------------------------------------------------------------------------------------

_SNAKE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
_NON_BASE_TIME_UNITS = {"milliseconds", "ms", "microseconds", "us", "nanoseconds", "ns", "minutes", "hours"}
_NON_BASE_SIZE_UNITS = {"kilobytes", "megabytes", "gigabytes", "kb", "mb", "gb", "kib", "mib", "gib"}
_NON_BASE_UNITS = _NON_BASE_TIME_UNITS | _NON_BASE_SIZE_UNITS | {"days", "percent"}
_CADVISOR_NAMES = {name for name in METRICS if name.startswith("container_")}
# the Prometheus client's own process and GC series keep the names every exporter gives them
_CLIENT_NAMES = {name for name in METRICS if name.startswith(("process_", "python_gc_"))}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_catalog_names_follow_the_naming_guide(name: str) -> None:
    kind, labels = METRICS[name]
    assert kind in ("counter", "gauge", "histogram")
    assert _SNAKE.match(name), f"{name}: not snake_case"
    assert name.startswith("berth_") or name in _CADVISOR_NAMES | _CLIENT_NAMES, (
        f"{name}: needs the berth_ prefix"
    )
    assert (kind == "counter") == name.endswith("_total"), f"{name}: counters and only counters end in _total"
    assert not name.endswith(HISTOGRAM_SUFFIXES), f"{name}: clashes with histogram series names"
    words = name.split("_")
    assert not _NON_BASE_UNITS & set(words), f"{name}: use base units (seconds, bytes)"
    base = name.removesuffix("_total")
    for unit in ("seconds", "bytes"):
        if unit in words:
            assert base.endswith("_" + unit), f"{name}: the unit {unit} goes at the end (before _total)"
    if kind == "histogram":
        assert base.endswith(("_seconds", "_bytes")), f"{name}: a histogram needs a unit suffix"
    assert labels == tuple(sorted(set(labels))), f"{name}: labels must be a sorted tuple without repeats"
    for label in labels:
        assert re.match(r"^[a-z][a-z0-9_]*$", label), f"{name}: label {label} is not snake_case"
        assert label not in ("le", "quantile", *TARGET_LABELS), f"{name}: label {label} is reserved"
    if name in _CADVISOR_NAMES:
        assert labels == ("node", "service", "task"), f"{name}: container_* carry service, task, node"


def test_catalog_has_one_line_help_for_every_metric() -> None:
    assert HELP.keys() == METRICS.keys()
    for name, text in HELP.items():
        assert text.strip() and "\n" not in text, f"{name}: help must be one non-empty line"


def test_catalog_series_names_do_not_collide() -> None:
    expanded = [
        name + suffix
        for name, (kind, _) in METRICS.items()
        for suffix in (HISTOGRAM_SUFFIXES if kind == "histogram" else ("",))
    ]
    assert len(expanded) == len(set(expanded)) == len(series_names())


# --- the PromQL helpers themselves ------------------------------------------------------------------


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, method) (rate(foo_seconds_bucket{code="bar_total"}[5m])))'
        " > on (instance) group_left () baz offset 1m or vector(1e3) and up == bool 0"
    )
    assert metric_names(expr) == {"foo_seconds_bucket", "baz", "up"}
    assert selector_labels(expr) == [("foo_seconds_bucket", {"code"})]
    assert grouping_labels(expr) == {"le", "method", "instance"}
    assert metric_names("sum(berth_no_such_metric)") - KNOWN_SERIES.keys() == {"berth_no_such_metric"}


def test_substitute_fills_grafana_variables() -> None:
    assert (
        substitute('rate(x{service="$service"}[$__rate_interval]) + y{node="${node}"}', {"service", "node"})
        == 'rate(x{service="web"}[1m]) + y{node="node-1"}'
    )
    with pytest.raises(AssertionError):
        substitute('x{task="$task"}', set())


# --- Prometheus -------------------------------------------------------------------------------------


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    assert_promtool_ok("check", "config", PROMETHEUS_YML)


@needs_promtool
def test_alert_rules_are_valid() -> None:
    assert_promtool_ok("check", "rules", ALERTS_YML)


@needs_promtool
def test_alert_rules_unit_tests_pass() -> None:
    assert_promtool_ok("test", "rules", ALERTS_TEST_YML)


def test_scrape_config_discovers_berth_from_the_controller() -> None:
    config = load_yaml(PROMETHEUS_YML)
    assert "berth dev up --monitoring" in PROMETHEUS_YML.read_text().split("\n\n")[0]
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "berth"
    assert job["scrape_interval"] == "5s"
    assert not job.get("honor_labels", False)
    assert job["http_sd_configs"] == [{"url": "http://127.0.0.1:9370/sd", "refresh_interval": "5s"}]
    jobs = {}
    for relabel in job["relabel_configs"]:
        target = relabel.get("target_label")
        assert target not in ALL_LABELS - set(TARGET_LABELS), (
            f"target label {target} clashes with an exported label (it would become exported_{target})"
        )
        if target == "job":
            assert relabel["source_labels"] == ["__meta_berth_component"]
            jobs[relabel["regex"]] = relabel["replacement"]
    assert jobs == {"controller": "berth-controller", "agent": "berth-agent"}


def test_alerts_have_for_severity_and_templated_annotations() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        name = rule["alert"]
        assert "for" in rule, f"{name}: needs for:"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), f"{name}: severity"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), f"{name}: annotations"
        assert any("{{" in annotations[key] for key in ("summary", "description")), f"{name}: templating"


def test_alerts_are_unit_tested_firing_and_not_firing() -> None:
    tests = load_yaml(ALERTS_TEST_YML)
    assert tests["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in tests["tests"]:
        for series in group.get("input_series", []):
            name = series["series"].split("{")[0].strip()
            assert name in KNOWN_SERIES, f"{group['name']}: input series {name} is not in the catalog"
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == ALERTS, f"no firing case for {ALERTS - fires}"
    assert quiet == ALERTS, f"no non-firing case for {ALERTS - quiet}"


# --- Grafana ----------------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    (datasource,) = load_yaml(DATASOURCE_YML)["datasources"]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://127.0.0.1:9090"
    (provider,) = load_yaml(DASHBOARD_PROVIDER_YML)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard_structure(uid: str) -> None:
    dashboard = load_dashboard(uid)
    assert dashboard["uid"] == uid
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(iter_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"{uid}: panel ids repeat"
    for panel in query_panels(dashboard):
        where = f"{uid} panel {panel['id']}"
        assert panel.get("title"), f"{where}: no title"
        assert panel.get("datasource", {}).get("uid") == DATASOURCE_UID, f"{where}: datasource"
        targets = panel.get("targets", [])
        assert targets, f"{where} ({panel['title']!r}): no targets"
        for target in targets:
            assert target.get("expr"), f"{where} target {target.get('refId')}: no expr"
            assert target.get("datasource", {}).get("uid") == DATASOURCE_UID, f"{where}: target datasource"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: refIds repeat"


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard_variables_query_catalog_labels(uid: str) -> None:
    dashboard = load_dashboard(uid)
    variables = dashboard.get("templating", {}).get("list", [])
    for variable in variables:
        assert variable["datasource"]["uid"] == DATASOURCE_UID
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)", query)
        assert match, f"{uid}: variable {variable['name']}: expected label_values(metric, label): {query}"
        metric, label = match.groups()
        assert metric in KNOWN_SERIES and label in label_sets(metric), f"{uid}: {query} names unknown things"
    used = {
        m.group(1) or m.group(2) for _, expr in dashboard_exprs(dashboard) for m in _VARIABLE.finditer(expr)
    }
    assert used - set(GRAFANA_BUILTINS) <= {v["name"] for v in variables}


@needs_promtool
@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard_promql_parses(uid: str, tmp_path: Path) -> None:
    dashboard = load_dashboard(uid)
    variables = dashboard_variables(dashboard)
    rules = [
        {"record": f"dashboard:{uid.replace('-', '_')}:expr_{i}", "expr": substitute(expr, variables)}
        for i, (_, expr) in enumerate(dashboard_exprs(dashboard))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": uid, "rules": rules}]}, sort_keys=False))
    assert_promtool_ok("check", "rules", path)


@needs_promtool
def test_promql_check_rejects_a_broken_expression(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    rules = [{"record": "x:broken", "expr": "sum by (le (rate(berth_failover_seconds_bucket[1m]))"}]
    path.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": rules}]}))
    assert run_promtool("check", "rules", path).returncode != 0


@pytest.mark.parametrize(
    ("where", "raw_expr", "variables"), [pytest.param(*case, id=case[0]) for case in all_exprs()]
)
def test_promql_names_only_catalog_metrics_and_labels(
    where: str, raw_expr: str, variables: frozenset[str]
) -> None:
    expr = substitute(raw_expr, set(variables))
    names = metric_names(expr)
    assert names, f"{where}: selects no metric: {expr}"
    unknown = names - KNOWN_SERIES.keys()
    assert not unknown, f"{where}: metrics not in tests/unit/metric_catalog.py: {sorted(unknown)}"
    for name, labels in selector_labels(expr):
        assert name, f"{where}: a selector without a metric name cannot be checked: {expr}"
        extra = labels - label_sets(name)
        assert not extra, f"{where}: {name} has no label(s) {sorted(extra)}"
    extra = grouping_labels(expr) - ALL_LABELS
    assert not extra, f"{where}: groups by label(s) no metric has: {sorted(extra)}"
    for name in _COUNTER_FUNCTION_ARG.findall(strip_strings(expr)):
        assert is_counter_like(name), f"{where}: rate()/increase() of {name}, which is not a counter"
    for name in names:
        if name.endswith("_bucket"):
            assert "histogram_quantile" in expr, f"{where}: {name} outside histogram_quantile"
