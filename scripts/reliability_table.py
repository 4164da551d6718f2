"""Run the reliability tests and write ``docs/reliability.md`` from their outcomes.

Every test marked ``@pytest.mark.reliability(area=..., case=..., expect=...)`` is one row (its
parametrizations are gathered in the row); the outcome column is what the run gave: passed,
skipped (with the reason), a known limitation (a strict ``xfail``, with where the fix belongs), or
FAILED. What the user sees (error messages, measured differences) comes from the tests'
``record_property("observed", ...)``.

    python scripts/reliability_table.py            # runs the tests (~2 minutes on 2 cores), writes the file
    python scripts/reliability_table.py --check    # exit 1 if the file would change
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "reliability.md"
TEST_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_reliability*.py")) + [
    "tests/test_combine_properties.py"
]
AREAS = [
    "bad input at nag.apply",
    "bad input at handle.update",
    "bad input at generation",
    "pipeline",
    "attention patched by another tool",
    "numerics (nag_combine)",
    "fault during a generation",
    "state",
    "composition",
]


class Collector:
    """A pytest plugin that keeps, per reliability row, the outcome of each parametrization."""

    def __init__(self) -> None:
        self.rows: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self.row_of: dict[str, tuple[str, str]] = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            marker = item.get_closest_marker("reliability")
            if marker is None:
                continue
            area, case, expect = marker.kwargs["area"], marker.kwargs["case"], marker.kwargs["expect"]
            key = (area, case)
            row = self.rows.setdefault(key, {"expect": expect, "results": OrderedDict()})
            variant = item.callspec.id if hasattr(item, "callspec") else ""
            variant = variant.replace(case, "").strip("-")  # ids that repeat the case add nothing
            row["results"][item.nodeid] = {"variant": variant, "outcome": None, "detail": "", "observed": []}
            self.row_of[item.nodeid] = key

    def pytest_runtest_logreport(self, report):
        key = self.row_of.get(report.nodeid)
        if key is None:
            return
        result = self.rows[key]["results"][report.nodeid]
        observed = [str(value) for name, value in report.user_properties if name == "observed"]
        if observed:
            result["observed"] = observed
        if report.when == "setup" and report.skipped:
            result["outcome"], result["detail"] = "skip", _skip_reason(report)
        elif report.when == "call":
            if hasattr(report, "wasxfail"):
                result["outcome"], result["detail"] = ("known limitation", report.wasxfail) if report.skipped else (
                    "FAILED", "passed unexpectedly (strict xfail)")
            elif report.skipped:
                result["outcome"], result["detail"] = "skip", _skip_reason(report)
            elif report.passed:
                result["outcome"] = "pass"
            else:
                result["outcome"], result["detail"] = "FAILED", str(report.longrepr).splitlines()[-1][:200]
        elif report.failed:
            result["outcome"], result["detail"] = "FAILED", f"error in {report.when}"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def _outcome_cell(results: OrderedDict[str, dict]) -> str:
    groups: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
    for result in results.values():
        groups.setdefault((result["outcome"] or "not run", result["detail"]), []).append(result["variant"])
    parts = []
    single = len(results) == 1
    for (outcome, detail), variants in groups.items():
        named = [] if single else [v for v in variants if v]
        text = f"**{outcome}**"
        if named:
            text += f" ({', '.join(named)})" if len(named) <= 12 else f" ({len(named)} variants)"
        elif len(variants) > 1:
            text += f" ({len(variants)} variants)"
        if detail:
            text += f": {detail}"
        parts.append(text)
    return "<br>".join(_cell(p, 600) for p in parts)


def _observed_cell(results: OrderedDict[str, dict]) -> str:
    seen: list[str] = []
    for result in results.values():
        for text in result["observed"]:
            if text not in seen:
                seen.append(text)
    if len(seen) > 3:
        seen = seen[:3] + [f"... ({len(seen) - 3} more)"]
    return "<br>".join(_cell(text, 260) for text in seen)


def render(rows: OrderedDict[tuple[str, str], dict]) -> str:
    import diffusers
    import torch
    import transformers

    counts: dict[str, int] = {}
    for row in rows.values():
        for result in row["results"].values():
            counts[result["outcome"] or "not run"] = counts.get(result["outcome"] or "not run", 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    lines = [
        "# Reliability: bad inputs, faults and combinations",
        "",
        "<!-- Generated by `python scripts/reliability_table.py` from the tests marked "
        "`@pytest.mark.reliability`; do not edit by hand. -->",
        "",
        "Every row is a test (`tests/test_reliability_*.py`, `tests/test_combine_properties.py`) run on the tiny "
        "random-weight pipelines of `tests/tiny_pipelines.py`, CPU only. *Outcome* is what the last run gave, per "
        "variant (pipeline, order, ...): **pass** means the behaviour in *Expected* was checked and holds; **skip** "
        "gives the reason the case cannot run on this machine; **known limitation** is a strict `xfail` whose "
        "reason says where the fix belongs. *Observed* is what a user sees: the error message, or the measured "
        "differences.",
        "",
        f"Run on Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}: {summary}.",
        "",
    ]
    keys = list(rows)
    ordered_areas = [a for a in AREAS if any(k[0] == a for k in keys)] + sorted(
        {k[0] for k in keys} - set(AREAS)
    )
    for area in ordered_areas:
        header = ["| case | expected | outcome | observed |", "|---|---|---|---|"]
        lines += [f"## {area[0].upper()}{area[1:]}", "", *header]
        for (row_area, case), row in rows.items():
            if row_area != area:
                continue
            lines.append(
                f"| {_cell(case)} | {_cell(row['expect'])} | {_outcome_cell(row['results'])} | "
                f"{_observed_cell(row['results'])} |"
            )
        lines.append("")
    lines += ["<!-- rows:", *[f"{area} :: {case}" for area, case in keys], "-->", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file would change")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    collector = Collector()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "reliability", *TEST_FILES], plugins=[collector])
    text = render(collector.rows)
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        strip = lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("Run on Python"))  # noqa: E731
        changed = strip(current) != strip(text)
        print(f"{OUTPUT.relative_to(ROOT)} {'would change' if changed else 'is up to date'}")
        return 1 if changed or code not in (0,) else 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(collector.rows)} rows); pytest exit code {int(code)}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
