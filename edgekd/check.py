"""`edgekd check`: compare a run's report.json with a stored baseline.

A baseline holds, per tracked metric, the accepted value, a tolerance (`abs` points or
`rel` fraction) and a direction. Latency is gated as a same-run ratio (e.g. fp32 / int8
p50 on one runtime), so a slower or busier CI machine does not flap the gate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import EdgekdError
from .fileio import write_json

# (substring of the flat key, direction, default tolerance); first match wins
RULES = [
    (".top1", "higher", {"abs": 2.0}),
    (".ece", "lower", {"abs": 0.05}),
    ("speedup.", "higher", {"rel": 0.30}),
    (".size_bytes", "lower", {"rel": 0.05}),
    (".macs", "lower", {"rel": 0.02}),
    (".params", "lower", {"rel": 0.02}),
]
TRACK = ("model.", "stage.benchmark.speedup.")


def _rule(key: str) -> tuple[str, dict] | None:
    for sub, direction, tol in RULES:
        if sub in key:
            return direction, tol
    return None


def _load(path: Path, what: str) -> dict:
    if not path.is_file():
        raise EdgekdError(f"{what} {path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgekdError(f"{what} {path}: not valid JSON ({e})") from None


def baseline_from_report(report: dict, old: dict | None = None) -> dict:
    old_metrics = (old or {}).get("metrics", {})
    metrics = {}
    for key, value in report["metrics"].items():
        if key in old_metrics or (key.startswith(TRACK) and _rule(key) and "_fake_quant" not in key):
            rule = _rule(key) or ("higher", {"abs": 0.0})
            prev = old_metrics.get(key, {})
            metrics[key] = {"value": value, "tolerance": prev.get("tolerance", rule[1]),
                            "direction": prev.get("direction", rule[0])}
    return {"pipeline": report.get("pipeline"), "machine": report.get("machine"), "versions": report.get("versions"),
            "created": report.get("created"), "metrics": metrics}


def compare(report: dict, baseline: dict) -> tuple[list[dict], bool]:
    rows, failed = [], False
    now = report.get("metrics", {})
    for key, spec in baseline.get("metrics", {}).items():
        base, tol, direction = spec["value"], spec.get("tolerance", {}), spec.get("direction", "higher")
        allowed = tol.get("abs", 0.0) + abs(base) * tol.get("rel", 0.0)
        tol_text = " + ".join([f"±{tol['abs']:g}" if "abs" in tol else "", f"±{tol['rel']:.0%}" if "rel" in tol else ""]).strip(" +")
        if key not in now:
            rows.append({"metric": key, "baseline": base, "now": None, "delta": None, "tolerance": tol_text, "verdict": "MISSING"})
            failed = True
            continue
        value = now[key]
        delta = value - base
        worse = -delta if direction == "higher" else delta
        verdict = "REGRESSION" if worse > allowed else "improved" if -worse > allowed else "ok"
        failed |= verdict == "REGRESSION"
        rows.append({"metric": key, "baseline": base, "now": value, "delta": delta, "tolerance": tol_text, "verdict": verdict})
    return rows, failed


def _num(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) < 1000:
        return f"{v:.4g}"
    return f"{v:,.0f}" if abs(v) >= 1000 else str(v)


def format_table(rows: list[dict]) -> str:
    head = ["metric", "baseline", "now", "delta", "tolerance", "verdict"]
    cells = [[r["metric"], _num(r["baseline"]), _num(r["now"]),
              ("+" if (r["delta"] or 0) > 0 else "") + _num(r["delta"]) if r["delta"] is not None else "–",
              r["tolerance"], r["verdict"]] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    line = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, cells)])


def run_check(report_path: Path, baseline_path: Path, update: bool = False) -> int:
    if report_path.is_dir():
        report_path = report_path / "report.json"
    report = _load(report_path, "report")
    if "metrics" not in report:
        raise EdgekdError(f"report {report_path}: no 'metrics' section (not an edgekd report.json?)")
    if update:
        old = _load(baseline_path, "baseline") if baseline_path.exists() else None
        new = baseline_from_report(report, old)
        write_json(baseline_path, new)
        print(f"baseline {baseline_path}: {len(new['metrics'])} metrics written")
        return 0
    baseline = _load(baseline_path, "baseline")
    rows, failed = compare(report, baseline)
    print(format_table(rows))
    n_reg = sum(r["verdict"] in ("REGRESSION", "MISSING") for r in rows)
    n_imp = sum(r["verdict"] == "improved" for r in rows)
    summary = f"{len(rows)} metrics: {n_reg} regressed or missing, {n_imp} improved beyond tolerance"
    print(("FAIL: " if failed else "PASS: ") + summary, file=sys.stdout)
    return 1 if failed else 0
