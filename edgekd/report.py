"""report.json (stable, machine-readable; the CI gate reads it) and report.md with plots.

The report.json schema (version SCHEMA_VERSION) is documented in README.md, "report.json";
an end-to-end test holds the latency entries to that list."""

from __future__ import annotations

import logging
from pathlib import Path

from .fileio import atomic_path, write_json, write_text

log = logging.getLogger("edgekd")
SCHEMA_VERSION = 1
_SKIP = {"per_class", "label", "latency", "n"}


def flat_metrics(stages: list[dict], models: dict[str, dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in stages:
        for k, v in s.get("metrics", {}).items():
            if isinstance(v, (int, float)) and k not in _SKIP:
                out[f"stage.{s['name']}.{k}"] = v
    for name, m in models.items():
        for k, v in m.items():
            if isinstance(v, (int, float)) and k not in _SKIP:
                out[f"model.{name}.{k}"] = v
        for rt, lat in (m.get("latency") or {}).items():
            for k, v in lat.items():
                if isinstance(v, (int, float)):
                    out[f"latency.{rt}.{name}.{k}"] = v
    return out


def headline(models: dict[str, dict]) -> str:
    from .bench.summary import headline_sentence

    return headline_sentence(models)


def machine_info() -> dict:
    from .bench.machine import machine_info as mi

    return mi()


def _without_predictions(obj):
    if isinstance(obj, dict):
        return {k: _without_predictions(v) for k, v in obj.items() if k != "predictions"}
    if isinstance(obj, list):
        return [_without_predictions(v) for v in obj]
    return obj


def write_predictions(run_dir: Path, models: dict[str, dict], labels: list[int] | None, split_key: str | None) -> None:
    """predictions.json: every variant's per-image top-1 on the test split, with the labels, so
    `edgekd check` can compare a run with its baseline image by image (metrics.paired)."""
    preds = {k: m["predictions"] for k, m in models.items() if isinstance(m.get("predictions"), list)}
    if labels is not None and preds:
        write_json(run_dir / "predictions.json", {"split": split_key, "labels": labels, "models": preds})


def write_reports(run_dir: Path, cfg, manifest: dict, stages: list[dict], models: dict[str, dict], teacher: dict | None,
                  labels: list[int] | None = None, split_key: str | None = None) -> None:
    write_predictions(run_dir, models, labels, split_key)
    stages, models = _without_predictions(stages), _without_predictions(models)
    teacher = _without_predictions(teacher)
    report = {
        "schema_version": SCHEMA_VERSION,
        "pipeline": cfg.name,
        "created": manifest.get("created"),
        "run_dir": str(run_dir),
        "seed": cfg.seed,
        "device": manifest.get("device"),
        "threads": manifest.get("threads"),
        "versions": manifest.get("versions"),
        "machine": machine_info(),
        "teacher": {k: v for k, v in teacher.items() if k != "per_class"} if teacher else None,
        "stages": [{k: s.get(k) for k in ("index", "name", "seconds", "metrics", "models", "artifacts", "info", "history")} for s in stages],
        "models": models,
        "headline": headline(models),
        "skipped_images": manifest.get("skipped_images") or {"count": 0, "files": []},
        "warnings": [{"stage": None, "message": m} for m in manifest.get("warnings", [])] +
                    [{"stage": s["name"], "message": m} for s in manifest.get("stages", []) for m in s.get("warnings", [])],
        "metrics": flat_metrics(stages, models),
    }
    write_json(run_dir / "report.json", report)
    plots = _plots(run_dir, stages, models)
    write_text(run_dir / "report.md", render_markdown(report, plots))


# ----------------------------------------------------------------------------- markdown


def _fmt_int(n) -> str:
    if n is None:
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n) -> str:
    if n is None:
        return "–"
    for unit, div in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    from .bench.summary import NOT_FASTER, headline_parts, latency_columns, not_faster, shown_top1

    L = [f"# edgekd report: {report['pipeline']}", ""]
    result, slow, notes = headline_parts(report["models"])  # report.json's headline, one runtime a line
    L += [f"**{result}**", ""]
    if len(slow) > 1:
        L += [f"**{NOT_FASTER} on:**", ""] + [f"- {s}" for s in slow] + [""]
    elif slow:
        L += [f"**{not_faster(slow)}**", ""]
    L += [f"- {n}" for n in notes] + ([""] if notes else [])
    mach = report["machine"]
    from .bench.machine import int8_class, isa_text

    L.append(f"Run {report['created']} on {mach.get('cpu')}, {int8_class(mach.get('isa', []), mach.get('arch', ''))} "
             f"({isa_text(mach)}), "
             f"{mach.get('cores')} cores, device `{report['device']}`, torch threads {report['threads']}"
             f"{', PyTorch CPU kernels ' + mach['torch_kernels'] if mach.get('torch_kernels') else ''}, seed {report['seed']}.")
    L.append("")
    skipped = report.get("skipped_images") or {}
    if skipped.get("count"):
        files = skipped["files"]
        shown = "; ".join(f"`{f['file']}` ({f['reason']})" for f in files[:5]) + (f"; and {len(files) - 5} more" if len(files) > 5 else "")
        n = skipped["count"]
        L += [f"**{n} unreadable image{' was' if n == 1 else 's were'} left out** (`data.skip_bad_images`, all listed in "
              f"report.json): {shown}", ""]
    models = report["models"]
    runtimes, lat = latency_columns(models)
    head = ["model", "top-1 %", "ECE", "params", "MACs", "size"] + [f"{r} ms" for r in runtimes]
    L += ["## Models", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    bench_only = set()
    for name, m in models.items():
        # models first measured by the benchmark stage carry their accuracy per runtime (on its eval images)
        top1, mark = m.get("top1"), ""
        if top1 is None:
            measured = [v for v in (m.get("latency") or {}).values() if "top1" in v]
            top1, mark = shown_top1(m), "†" if measured else ""
            bench_only |= {v.get("eval_images") for v in measured}
        row = [m.get("label", name), "–" if top1 is None else f"{top1:.2f}{mark}", f"{m['ece']:.3f}" if "ece" in m else "–",
               _fmt_int(m.get("params")), _fmt_int(m.get("macs")), _fmt_bytes(m.get("size_bytes"))]
        row += [lat.get((name, r), "–") for r in runtimes]
        L.append("| " + " | ".join(row) + " |")
    if bench_only:
        L += ["", f"† measured by the benchmark stage on {', '.join(str(n) for n in sorted(bench_only, key=str))} test "
                  "images (`benchmark.eval_images`); a runtime's own top-1 is in brackets where it differs."]
    L += ["", "## Stages", "", "| # | stage | seconds | top-1 % | ECE | params | MACs |", "|---|---|---|---|---|---|---|"]
    for s in report["stages"]:
        m = s.get("metrics") or {}
        L.append(f"| {s['index']} | {s['name']} | {s['seconds']} | {m.get('top1', '–')} | {m.get('ece', '–')} | "
                 f"{_fmt_int(m.get('params'))} | {_fmt_int(m.get('macs'))} |")
    for s in report["stages"]:
        info = {k: v for k, v in (s.get("info") or {}).items() if not isinstance(v, (list, dict))}
        if info:
            L += ["", f"**{s['name']}**: " + "; ".join(f"{k} = {v}" for k, v in info.items())]  # values may hold commas
        L += _steps_table((s.get("info") or {}).get("steps"))
        L += _plan_table(s.get("info") or {})
        L += _by_op_table((s.get("info") or {}).get("int8_vs_fp32_by_op"), ONNX_BY_OP)
        L += _format_plans_table(s.get("info") or {})
    if said := report.get("warnings"):
        L += ["", f"## Warnings ({len(said)})", ""]
        L += [f"- **{w['stage'] or 'before the stages'}**: {w['message']}" for w in said]
    from .bench.quality import quality_markdown

    L += quality_markdown(models)
    for title, fname in plots.items():
        L += ["", f"## {title}", "", f"![{title}]({fname})"]
    L += ["", "Figures are machine-readable in `report.json` (`metrics` holds the flat keys `edgekd check` compares).", ""]
    return "\n".join(L)


def _steps_table(steps) -> list[str]:
    """Per prune step: what pruning cost, what BN recalibration and the fine-tune won back."""
    if not isinstance(steps, list) or not steps:
        return []
    cols = [("step", "step"), ("macs_kept", "MACs kept"), ("params", "params"), ("top1_after_prune", "top-1 pruned"),
            ("top1_after_bn_recalibration", "after BN recal."), ("top1_after_finetune", "after fine-tune"),
            ("recovered_points", "fine-tune gain")]
    L = ["", "| " + " | ".join(c for _, c in cols) + " |", "|" + "---|" * len(cols)]
    for st in steps:
        cells = []
        for k, _ in cols:
            v = st.get(k)
            cells.append("–" if v is None else f"{v:.1%}" if k == "macs_kept" else _fmt_int(v) if k == "params" else str(v))
        L.append("| " + " | ".join(cells) + " |")
    return L


def _judging(split: str | None) -> str:
    """Which images judged int8 plans ('val', 'test (1000 images)'): a held-out validation split, else
    the test split, which then both chooses a plan and reports it (an optimistic bias worth saying)."""
    if not split:
        return "the judging split"
    name, _, n = split.partition(" (")
    n = n.rstrip(")")
    if name == "val":
        return f"the validation split{f' ({n})' if n else ''}"
    return f"the test split ({f'{n}; ' if n else ''}no `data.val_split`, so these images also report the result)"


def _plan_table(info: dict) -> list[str]:
    """The quantization plans the quantize stage timed (quant.plan): which one it kept and why."""
    cands = info.get("plan_candidates")
    if not isinstance(cands, list) or not cands:
        return []
    rt = info.get("plan_runtime", "onnxruntime")
    L = ["", f"Quantization plans timed on {rt} (1 thread, batch 1, medians of interleaved rounds); top-1 on "
             f"{_judging(info.get('plan_judged_on'))}, – where not evaluated (a faster plan already held):", "",
         "| plan | blocks kept fp32 | p50 ms | vs fp32 | top-1 % | drop (points) |", "|---|---|---|---|---|---|"]
    for c in cands:
        mark = " **(kept)**" if c["plan"] == info.get("plan") else ""
        blocks = ", ".join(c["fp32_blocks"]) if len(c["fp32_blocks"]) <= 4 else f"{len(c['fp32_blocks'])} blocks"
        L.append(f"| {c['plan']}{mark} | {blocks or '–'} | {c['p50_ms']} | {c['speedup_vs_fp32']}x | "
                 f"{'–' if c.get('top1') is None else round(c['top1'], 2)} | "
                 f"{'–' if c.get('drop_points') is None else c['drop_points']} |")
    return L


def _by_op_table(rows, caption: str) -> list[str]:
    """An int8 program's time against its fp32 program's, kind of op by kind of op (quant.plan.
    kind_comparison): why int8 is as fast as it is on this CPU."""
    if not isinstance(rows, list) or not rows:
        return []
    cell = lambda us, n: "–" if us is None else f"{us:g} ({n})"  # noqa: E731
    L = ["", caption, "", "| ops | fp32 µs | int8 µs | int8 speed-up |", "|---|---|---|---|"]
    for r in rows:
        speed = "–" if r["int8_speedup"] is None else f"{r['int8_speedup']}x"
        if r["int8_speedup"] is not None and r["int8_speedup"] < 1:
            speed = f"**{speed}** (slower)"
        L.append(f"| {r['ops']} | {cell(r['fp32_us'], r['fp32_nodes'])} | {cell(r['int8_us'], r['int8_nodes'])} | {speed} |")
    return L


ONNX_BY_OP = ("Where the int8 ONNX file's time goes against the fp32 file's, by kind of op (onnxruntime's profiler: "
              "microseconds per image in its kernels, 1 thread, batch 1; nodes in brackets; an fp32 add runs inside "
              "its convolution):")


def _format_plans_table(info: dict) -> list[str]:
    """The int8 program each format with its own quantizer ships (formats.int8_plan), per variant."""
    rows = [(variant, key[: -len("_int8_plan")], rec) for variant, figs in info.items() if isinstance(figs, dict)
            for key, rec in figs.items() if key.endswith("_int8_plan") and isinstance(rec, dict)]
    if not rows:
        return []
    judged = next((rec["judged_on"] for _, _, rec in rows if rec.get("judged_on")), None)
    L = ["", "int8 programs of the formats that plan their own, each timed on its own runtime against its fp32 "
             f"program (1 thread, batch 1), top-1 on {_judging(judged)}; the kept one in bold:", "",
         "| file | runtime | candidate | p50 ms | vs fp32 | top-1 % |", "|---|---|---|---|---|---|"]
    for variant, fmt, rec in rows:
        if "candidates" not in rec:  # untimed: the program the plan it follows gives (formats.int8_plan.ship_untimed)
            L.append(f"| {variant} ({fmt}) | {rec.get('runtime', '')} | **{rec['chosen']}** (untimed, {rec.get('source')}) "
                     "| – | – | – |")
        for c in rec.get("candidates", []):
            name = f"**{c['plan']}**" if c["plan"] == rec.get("chosen") else c["plan"]
            if "not_written" in c:  # its PTQ twin's speed-up stands for it (formats.int8_plan.unwritten_twins)
                name, speed = f"{name} (not written)", f"{c['speedup_vs_fp32']}x (PTQ's)"
            else:
                speed = "–" if c["p50_ms"] is None else f"{c['speedup_vs_fp32']}x"
            L.append(f"| {variant} ({fmt}) | {rec.get('runtime', '')} | {name} | {'–' if c['p50_ms'] is None else c['p50_ms']} | "
                     f"{speed} | {'–' if c['top1'] is None else c['top1']} |")
    verdicts = [f"- {rec['verdict']}" for _, _, rec in rows if rec.get("verdict")]
    L += ["", *verdicts] if verdicts else []
    shown = set()  # one table per runtime: its PTQ and QAT programs run the same kernels, which gain and lose alike
    for variant, fmt, rec in rows:
        if "int8_vs_fp32_by_op" in rec and "by_op_of" not in rec and rec.get("runtime") not in shown:
            shown.add(rec.get("runtime"))
            L += _by_op_table(rec.get("int8_vs_fp32_by_op"), (
                f"Where {variant}'s {rec['by_op_program']} program's time goes on {rec.get('runtime')} against the fp32 "
                "program's, by kind of op (the runtime's own profiler: microseconds per image, 1 thread, batch 1; "
                "operators in brackets):"))
    return L


# ----------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plots(run_dir: Path, stages: list[dict], models: dict[str, dict]) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: report.md has no plots")
        return {}
    out: dict[str, str] = {}
    acc = [(m.get("label", k), m["top1"]) for k, m in models.items() if "top1" in m]
    if acc:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(acc) + 1))
        names, vals = zip(*acc)
        bars = ax.barh(range(len(vals)), vals, color="#4c72b0")
        ax.set_yticks(range(len(vals)), names)
        ax.invert_yaxis()
        ax.bar_label(bars, fmt="%.2f", padding=3)
        ax.set_xlabel("top-1 accuracy on the test split (%)")
        ax.set_xlim(max(0, min(vals) - 10), min(100, max(vals) + 6))
        ax.set_title("Accuracy by model / stage")
        _save(fig, run_dir / "accuracy.png")
        out["Accuracy by model and stage"] = "accuracy.png"
    curves = [(s["name"], s["history"]) for s in stages if s.get("history")]
    curves += [(f"{s['name']} baseline (ce)", s["info"]["baseline_history"]) for s in stages
               if isinstance((s.get("info") or {}).get("baseline_history"), list)]
    if curves:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
        for name, h in curves:
            ep = [r["epoch"] for r in h]
            a1.plot(ep, [r["loss"] for r in h], marker="o", label=name)
            key = next((k for k in ("val_top1", "test_top1") if any(k in r for r in h)), None)
            if key:
                pts = [(r["epoch"], r[key]) for r in h if key in r]
                a2.plot(*zip(*pts), marker="o", label=name)
        a1.set(xlabel="epoch", ylabel="training loss", title="Training loss")
        a2.set(xlabel="epoch", ylabel="top-1 %", title="Evaluation accuracy")
        a1.legend(fontsize=8)
        a2.legend(fontsize=8)
        _save(fig, run_dir / "training.png")
        out["Training curves"] = "training.png"
    from .bench.quality import quality_plots
    from .bench.summary import extra_plots

    out.update(extra_plots(run_dir, models, _save))
    out.update(quality_plots(run_dir, models, _save))
    return out
