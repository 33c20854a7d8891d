"""`edgekd check`: compare a run's report.json with a stored baseline.

A baseline holds, per tracked metric, the accepted value, a tolerance (`abs` points or
`rel` fraction) and a direction. Latency is gated as a same-run ratio (e.g. fp32 / int8
p50 on one runtime, taken round by round while the models are timed interleaved), so a
slower or busier CI machine does not flap the gate.

Accuracy is compared image by image where both the run and the baseline stored their
predictions on the same test images (predictions.json): an exact one-sided McNemar test
on the images where exactly one of the two is right. A drop is a regression when it is
both unlikely under "same model quality" (p < ALPHA) and at least MIN_DROP points; a fixed
tolerance alone either flaps on small test splits or misses real drops on large ones.

Speed ratios depend on the CPU class (int8 gains far more with VNNI than on AVX2-only x86),
so a baseline keeps them per class (`by_cpu`: --update-baseline writes the class it runs on,
--add-cpu-figures adds one class's ratios and leaves every other stored figure as it is); on a
class it has no figure for, a speedup must only stay above 1x, and no class's tolerance takes
its bound below that (a stored 1.25x with 30 % would let an int8 file slower than fp32 pass
where an unknown class would fail it). Within a class, machines and their load still differ,
and the figure is the median of per-round ratios of models timed for milliseconds each, so a
ratio below its bound is a regression only where the rounds agree: their upper quartile is
below the bound too (a real loss, e.g. an int8 file that stopped paying, moves every round; a
noisy moment moves a few).

Robustness is gated as mean top-1 on corrupted images. The drop from clean top-1 is reported
but not gated: it is the difference of two gated figures, and it grows when clean top-1
improves, which is no regression.

The size of an int8 file whose plan was timed (`quantize.plan: auto`) is not held to a stored
figure: the plan keeps fp32 the blocks where int8 does not pay on the machine it is timed on (and
then those whose int8 costs the most accuracy), so which blocks, and the file's size, move with
the CPU class and with timing noise on one machine. What the plan is for, the speed ratio and
top-1, is gated; its file must only be no larger than the fp32 file it was quantized from (a file
that stopped being int8 fails). A fixed plan's (`plan: int8`) size keeps its stored figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .errors import EdgekdError, InputError
from .fileio import write_json
from .metrics import paired

# (substring of the flat key, direction, default tolerance); first match wins
RULES = [
    (".top1", "higher", {"abs": 2.0}),
    (".corruption_top1", "higher", {"abs": 2.0}),
    (".ece", "lower", {"abs": 0.05}),
    ("speedup.", "higher", {"rel": 0.30}),
    (".size_bytes", "lower", {"rel": 0.05}),
    (".macs", "lower", {"rel": 0.02}),
    (".params", "lower", {"rel": 0.02}),
]
TRACK = ("model.", "stage.benchmark.speedup.")
ALPHA = 0.01  # McNemar significance for an accuracy regression
MIN_DROP = 0.5  # points: a significant drop smaller than this is not worth failing CI for


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


def _predictions(report_path: Path) -> dict | None:
    p = report_path.parent / "predictions.json"
    return json.loads(p.read_text()) if p.is_file() else None


def cpu_class(report: dict) -> str:
    from .bench.machine import int8_class

    m = report.get("machine") or {}
    return int8_class(m.get("isa", []), m.get("arch", ""))


def _planned_source(report: dict, key: str) -> str | None:
    """For `model.<v>.size_bytes` of an int8 file planned by timing (quantize stage, `plan: auto`):
    the variant it was quantized from, whose size bounds it."""
    variant, _, field = key.removeprefix("model.").partition(".")
    rec = (report.get("models") or {}).get(variant) or {}
    return rec.get("quantized_from") if field == "size_bytes" and rec.get("plan") == "auto" else None


def _bound(report: dict, key: str, spec: dict, cpu: str) -> tuple[float, str] | None:
    """A bound the figure must hold instead of its stored value (module docstring): a planned
    int8 file's size, and a speed ratio on a CPU class the baseline has no figure for."""
    src = _planned_source(report, key)
    if src and (size := report.get("metrics", {}).get(f"model.{src}.size_bytes")) is not None:
        return size, f"<= {src} (plan: auto, timed on this machine)"
    if "by_cpu" in spec and cpu not in spec["by_cpu"]:
        return 1.0, f"> 1x (no {cpu} figure)"
    return None


def baseline_from_report(report: dict, old: dict | None = None, predictions: dict | None = None) -> dict:
    old_metrics = (old or {}).get("metrics", {})
    metrics = {}
    cpu = cpu_class(report)
    for key, value in report["metrics"].items():
        if key in old_metrics or (key.startswith(TRACK) and _rule(key) and "_fake_quant" not in key):
            rule = _rule(key) or ("higher", {"abs": 0.0})
            prev = old_metrics.get(key, {})
            metrics[key] = {"value": value, "tolerance": prev.get("tolerance", rule[1]),
                            "direction": prev.get("direction", rule[0])}
            if "speedup." in key:
                metrics[key]["by_cpu"] = {**prev.get("by_cpu", {}), cpu: value}
    out = {"pipeline": report.get("pipeline"), "machine": report.get("machine"), "versions": report.get("versions"),
           "created": report.get("created"), "metrics": metrics}
    if predictions:
        tracked = {k.split(".")[1] for k in metrics if k.startswith("model.") and k.endswith(".top1")}
        out["predictions"] = {"split": predictions.get("split"), "labels": predictions["labels"],
                              "models": {k: v for k, v in predictions["models"].items() if k in tracked}}
    return out


def add_cpu_figures(report: dict, baseline: dict) -> tuple[dict, list[str]]:
    """The baseline with the report's speed ratios stored for the report's CPU class (by_cpu),
    every other figure, tolerance and the stored predictions left as they are: the accuracy
    reference stays the run it was made from, and each class's speed joins it."""
    cpu, added = cpu_class(report), []
    metrics = {k: dict(v) for k, v in baseline.get("metrics", {}).items()}
    for key, spec in metrics.items():
        if "speedup." in key and key in report.get("metrics", {}):
            spec["by_cpu"] = {**spec.get("by_cpu", {}), cpu: report["metrics"][key]}
            added.append(key)
    return {**baseline, "metrics": metrics}, added


def _paired_verdict(key: str, delta: float, baseline: dict, predictions: dict | None) -> tuple[str, str] | None:
    """(verdict, tolerance text) by the paired test, or None where it cannot be applied."""
    base = baseline.get("predictions")
    if not (base and predictions and key.startswith("model.") and key.endswith(".top1")):
        return None
    variant = key.split(".")[1]
    b, n = base["models"].get(variant), predictions["models"].get(variant)
    if b is None or n is None or base["labels"] != predictions["labels"] or len(b) != len(n):
        return None  # not the same images: fall back to the fixed tolerance
    t = paired(b, n, base["labels"])
    if t["p_worse"] < ALPHA and delta <= -MIN_DROP:
        return "REGRESSION", f"McNemar p={t['p_worse']:.2g} ({t['worse']} worse, {t['better']} better)"
    if t["p_better"] < ALPHA and delta >= MIN_DROP:
        return "improved", f"McNemar p={t['p_better']:.2g} ({t['better']} better, {t['worse']} worse)"
    return "ok", f"McNemar p={t['p_worse']:.2g} ({t['worse']} worse, {t['better']} better)"


def round_ratios(report: dict, key: str) -> np.ndarray | None:
    """The per-round ratios behind a speed-ratio metric (`stage.<stage>.speedup.<slow>/<fast>@<setting>`),
    from the two models' timing records in that stage's record (bench.measure.per_round_ratios)."""
    from .bench.measure import per_round_ratios

    stage, _, rest = key.removeprefix("stage.").partition(".speedup.")
    pair, _, setting = rest.partition("@")
    slow, _, fast = pair.partition("/")
    rec = next((s for s in report.get("stages", []) if isinstance(s, dict) and s.get("name") == stage), {})
    timed = lambda m: rec.get("models", {}).get(m, {}).get("latency", {}).get(setting, {})  # noqa: E731
    return per_round_ratios(timed(slow), timed(fast))


def compare(report: dict, baseline: dict, predictions: dict | None = None) -> tuple[list[dict], bool]:
    rows, failed = [], False
    now = report.get("metrics", {})
    cpu = cpu_class(report)
    for key, spec in baseline.get("metrics", {}).items():
        base, tol, direction = spec["value"], spec.get("tolerance", {}), spec.get("direction", "higher")
        tol_text = " + ".join([f"±{tol['abs']:g}" if "abs" in tol else "", f"±{tol['rel']:.0%}" if "rel" in tol else ""]).strip(" +")
        if cpu in spec.get("by_cpu", {}):
            base = spec["by_cpu"][cpu]
        bound = _bound(report, key, spec, cpu)
        if bound is not None:
            (base, tol_text), tol = bound, {}
        allowed = tol.get("abs", 0.0) + abs(base) * tol.get("rel", 0.0)
        if "speedup." in key and direction == "higher" and 1.0 < base <= 1.0 + allowed:
            allowed, tol_text = base - 1.0, "> 1x"  # no class's tolerance lets a speedup fall below 1x
        if key not in now:
            rows.append({"metric": key, "baseline": base, "now": None, "delta": None, "tolerance": tol_text, "verdict": "MISSING"})
            failed = True
            continue
        value = now[key]
        delta = value - base
        worse = -delta if direction == "higher" else delta
        verdict = "REGRESSION" if worse > allowed else "improved" if -worse > allowed and bound is None else "ok"
        if verdict == "REGRESSION" and "speedup." in key and (rounds := round_ratios(report, key)) is not None:
            q75 = float(np.percentile(rounds, 75))
            tol_text += f", rounds' q75 {q75:.3g}"
            if q75 >= base - allowed:  # a quarter of the rounds or more reach the bound: a noisy moment
                verdict = "ok"
        by_images = _paired_verdict(key, delta, baseline, predictions)
        if by_images:
            verdict, tol_text = by_images
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


def run_check(report_path: Path, baseline_path: Path, update: bool = False, add_cpu: bool = False) -> int:
    if report_path.is_dir():
        report_path = report_path / "report.json"
    report = _load(report_path, "report")
    if "metrics" not in report:
        raise EdgekdError(f"report {report_path}: no 'metrics' section (not an edgekd report.json?)")
    if add_cpu:
        new, added = add_cpu_figures(report, _load(baseline_path, "baseline"))
        if not added:
            raise InputError(f"report {report_path}: none of the baseline's speed ratios is in it (another pipeline?)")
        write_json(baseline_path, new)
        print(f"baseline {baseline_path}: {len(added)} speed ratios stored for {cpu_class(report)}")
        return 0
    if update:
        old = _load(baseline_path, "baseline") if baseline_path.exists() else None
        new = baseline_from_report(report, old, _predictions(report_path))
        write_json(baseline_path, new)
        print(f"baseline {baseline_path}: {len(new['metrics'])} metrics written")
        return 0
    baseline = _load(baseline_path, "baseline")
    rows, failed = compare(report, baseline, _predictions(report_path))
    print(format_table(rows))
    n_reg = sum(r["verdict"] in ("REGRESSION", "MISSING") for r in rows)
    n_imp = sum(r["verdict"] == "improved" for r in rows)
    summary = f"{len(rows)} metrics: {n_reg} regressed or missing, {n_imp} improved beyond tolerance"
    print(("FAIL: " if failed else "PASS: ") + summary, file=sys.stdout)
    return 1 if failed else 0
