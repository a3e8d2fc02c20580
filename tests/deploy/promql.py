"""Just enough PromQL reading to list the metric and label names an expression uses.

Not a parser: it drops string literals, range and subquery brackets, label
matchers and grouping clauses, then takes the identifiers that are neither
functions (followed by ``(``), keywords nor parts of numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE
)
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),)?\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan"}
    | {"by", "without", "on", "ignoring", "group_left", "group_right"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects."""
    text = _RANGE.sub("", _STRING.sub('""', expr))
    text = _GROUPING.sub("", _MATCHERS.sub("", text))
    names = set()
    for match in _IDENT.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        after = text[match.end() :].lstrip()[:1]
        if after == "(" or before.isdigit() or before == "." or before == "$":
            continue  # a function, a number's exponent or a Grafana variable
        if match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """The label names ``expr`` matches on or groups by."""
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for clause in _GROUPING.findall(text):
        labels |= {part.strip() for part in clause.split(",") if part.strip()}
    for matchers in _MATCHERS.findall(text):
        labels |= set(_MATCHER_LABEL.findall(matchers))
    return labels


def grafana_query(query: str) -> str:
    """The PromQL inside a Grafana variable query (``label_values(expr, label)``)."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        return query
    return match.group(1) or ""


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every variable query of a Grafana dashboard."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable ${variable['name']}", grafana_query(variable["query"]["query"])
