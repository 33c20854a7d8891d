"""Headline sentence, latency table columns and the benchmark plots of the report."""

from __future__ import annotations

from pathlib import Path

from ..quant.plan import MARGIN
from .measure import round_ratio


def _lat(m: dict, runtime: str) -> dict:
    """A model's figures on one runtime ({} where it was not measured there)."""
    return (m.get("latency") or {}).get(runtime) or {}


def _speedup(slow: dict, fast: dict, runtime: str) -> float | None:
    """How many times faster `fast` ran than `slow` on one runtime: the gate's figure (the median of
    per-round ratios where both were timed in the same rounds), not the ratio of their p50s, which a
    machine whose speed changes from round to round (a shared VM) can pull to either side."""
    a, b = _lat(slow, runtime), _lat(fast, runtime)
    return round_ratio(a, b) if a.get("p50_ms") and b.get("p50_ms") else None


def latency_columns(models: dict[str, dict]) -> tuple[list[str], dict]:
    runtimes: list[str] = []
    cells = {}
    for name, m in models.items():
        for rt, lat in (m.get("latency") or {}).items():
            if rt not in runtimes:
                runtimes.append(rt)
            if "p50_ms" in lat:  # with that runtime's accuracy where it differs from the model's
                own, shown = lat.get("top1"), shown_top1(m)
                differs = own is not None and shown is not None and abs(own - shown) >= 0.005
                cells[(name, rt)] = f"{lat['p50_ms']:.2f}" + (f" ({own:.2f} %)" if differs else "")
    return runtimes, cells


def shown_top1(m: dict) -> float | None:
    """The model's top-1, or for models only the benchmark measured, the first runtime's."""
    if m.get("top1") is not None:
        return m["top1"]
    return next((v["top1"] for v in (m.get("latency") or {}).values() if "top1" in v), None)


def _pick(models: dict[str, dict], prefix: str) -> str | None:
    cands = [k for k, m in models.items() if k.startswith(prefix) and "top1" in m and m.get("latency")]
    return max(cands, key=lambda k: models[k]["top1"]) if cands else None


GAIN_ALPHA = 0.05  # a KD-over-CE gain with a larger two-sided McNemar p is called noise


def gain_note(g: dict) -> str:
    """The teacher's gain over the same student trained without it, as significant or as noise
    (metrics.gain_over): on a few hundred test images a few points either way can be chance."""
    pts, evidence = g["points"], (f"{g['images']} test images, McNemar p = {g['p']:.2g}: {g['better']} better, "
                                  f"{g['worse']} worse")
    if g["p"] >= GAIN_ALPHA:
        return (f"the teacher's {pts:+.1f} points over the same student trained without it are within the test "
                f"images' noise ({evidence}); more test images or epochs would tell")
    if pts > 0:
        return f"the teacher bought {pts:+.1f} points over the same student trained without it ({evidence})"
    return f"the student trained without the teacher scored {-pts:.1f} points higher ({evidence})"


def headline_parts(models: dict[str, dict]) -> tuple[str, list[str], list[str]]:
    """The headline in pieces: (result, slow, notes).

    result: 'int8 QAT: 12.3x faster than teacher, 38x smaller, -2.1 points (onnxruntime/1t)' plus
    where int8 pays against the fp32 student (without a teacher latency: 'int8 QAT: top-1 89.00 % (-2.1
    points vs teacher) (...)'); slow: one 'onnxruntime/1t (1.05x...)' per runtime where it does not, or
    whose file is the fp32 program whatever its ratio ('here (1.05x)' with one runtime), each saying why
    where the run knows (its file is the fp32 program; the kinds of op its int8 kernels run slower, where
    its runtime profiles ops); notes: the rest.
    The CLI prints them as one line, report.md as a line and a list."""
    final = _pick(models, "int8") or _pick(models, "student") or _pick(models, "pruned")
    teacher = models.get("teacher_fp32") or models.get("teacher")
    guessed = (models.get("teacher") or {}).get("near_chance")  # the run's own measure of it (runner)
    notes = [f"the teacher scores {guessed}: distilling from it taught nothing (the log says what to check)"] if guessed else []
    gain = (models.get("student_distilled") or {}).get("vs_ce_baseline")  # distill.compare_baseline
    if gain and not guessed:
        notes.append(gain_note(gain))
    if not final:  # no latency measured: the pipeline's last model, never the untrained input for scoring higher
        made = [k for k in models if "top1" in models[k] and not k.startswith("teacher") and not k.endswith("_baseline")]
        best = next((k for k in reversed(made) if k != "student_input"), made[0] if made else None)
        if best is None:
            return "no student figures", [], notes
        tail = f" ({models[best]['top1'] - teacher['top1']:+.2f} points vs teacher)" if teacher and "top1" in teacher else ""
        return f"{models[best].get('label', best)}: top-1 {models[best]['top1']:.2f} %{tail}; no latency measured", [], notes
    m = models[final]
    rt = min(m["latency"], key=lambda k: m["latency"][k].get("p50_ms", float("inf")))  # its fastest runtime
    lat = m["latency"][rt]
    parts = []
    if teacher and (r := _speedup(teacher, m, rt)):
        parts.append(f"{r:.1f}x faster than teacher")
    named = bool(parts)  # after "faster than teacher" size and points read as the teacher's; else they say so
    t, t_lat = teacher or {}, _lat(teacher or {}, rt)  # size and top-1 as that runtime ran them
    t_size = t_lat.get("size_bytes") or t.get("size_bytes")
    if t_size and (lat.get("size_bytes") or m.get("size_bytes")):
        parts.append(f"{t_size / (lat.get('size_bytes') or m['size_bytes']):.0f}x smaller" + ("" if named else " than teacher"))
    top1 = lat.get("top1", m["top1"])
    t_top1 = t_lat.get("top1") or shown_top1(t)
    if t_top1 is not None:
        parts.append(f"{top1 - t_top1:+.1f} points" if named else f"top-1 {top1:.2f} % ({top1 - t_top1:+.1f} points vs teacher)")
    shipped_fp32 = m.get("fp32_program_on") or {}  # runtime -> its best int8 speed-up (formats.int8_plan)
    where_fp32 = ", where its file is the fp32 program" if rt.split("/")[0] in shipped_fp32 else ""
    result = f"{m.get('label', final)}: " + ", ".join(parts) + f" ({rt}{where_fp32})"
    slow = []
    fp32 = models.get("student_fp32")
    if final.startswith("int8") and fp32:
        ratios = sorted(((r, k) for k in m["latency"] if (r := _speedup(fp32, m, k))), reverse=True)
        where = (lambda k: f" on {k}") if len(ratios) > 1 else (lambda k: "")
        # a runtime whose file is the fp32 program is never "faster in int8": its ratio is two runs of one program
        fast = [(r, k) for r, k in ratios if r >= FASTER and k.split("/")[0] not in shipped_fp32]
        if fast:
            result += f"; int8 is {fast[0][0]:.2f}x the speed of the fp32 student{where(fast[0][1])}"
            result += "".join(f", {r:.2f}x on {k}" for r, k in fast[1:])
        plan = str(m.get("plan", "auto"))  # untimed: every program is the plan's (int8) or a pinned run's
        untimed = None if plan == "auto" else "quantize.plan: int8" if plan == "int8" else "a pinned plan"
        for r, k in ratios:
            if (r, k) not in fast:  # the NOTE holds every runtime the result does not
                rt_name = k.split("/")[0]
                # the profile of the int8 and fp32 files on that runtime: the quantize stage's (onnxruntime), the
                # export stage's (a format that plans its own int8 and whose runtime profiles ops: formats.int8_plan)
                losses = m.get(f"{rt_name}_int8_loses_time_on", "nothing")
                why = (_fp32_program(shipped_fp32[rt_name], losses) if rt_name in shipped_fp32 else
                       f": its program follows {untimed}, untimed on this machine; "
                       "plan: auto chooses per runtime" if untimed else f": int8 loses time on {losses}"
                       if losses != "nothing" else f", less than the {FASTER}x counted as faster" if round(r, 2) > 1 else "")
                slow.append(f"{k if len(ratios) > 1 else 'here'} ({r:.2f}x{why})")
        if str(m.get("int8_layers", "")).startswith("0/") and slow:
            plan_rt = m.get("plan_runtime", "onnxruntime")
            held = shipped_fp32.get(plan_rt, 0) >= 1 + MARGIN  # faster in int8, kept out by the accuracy budget
            notes.append("the quantization plan keeps every ONNX layer fp32: " + (
                f"no int8 plan held quantize.max_drop_points on {plan_rt}" if held else
                f"int8 did not pay on {plan_rt} on this CPU") + " (quant_plan.json says what it cost)")
    return result, slow, notes


def _fp32_program(best: float, losses: str) -> str:
    """Why a runtime's int8 file is the fp32 program, from its fastest int8 program's speed-up: too slow
    (and on what, where its runtime profiles ops), or faster but kept out on accuracy: by
    quantize.max_drop_points in the quantize stage's plan (quant.plan.choose), by the top-1 agreement
    with the fp32 program that verification requires in a format's own plan (formats.int8_plan.choose_int8,
    which ships a faster int8 program outside max_drop_points rather than the fp32 one)."""
    if best >= 1 + MARGIN:
        return f": its file is the fp32 program, as no int8 program held the accuracy budget (the fastest ran at {best:.2f}x)"
    return f": its file is the fp32 program, int8 ran at {best:.2f}x there" + (
        f", losing time on {losses}" if losses != "nothing" else "")


NOT_FASTER = "NOTE: int8 is not faster than the fp32 student"
FASTER = 1.1  # a smaller same-run ratio is within what two timings of one program differ by on a shared VM


def not_faster(slow: list[str]) -> str:
    """'NOTE: int8 is not faster than the fp32 student on a (1.05x), b (0.9x)' or '... here (0.95x)'."""
    return f"{NOT_FASTER} " + ("" if slow[0].startswith("here") else "on ") + ", ".join(slow)


def headline_sentence(models: dict[str, dict]) -> str:
    """The headline as one line (the CLI's last words, report.json's `headline`)."""
    result, slow, notes = headline_parts(models)
    return "; ".join([result, *([not_faster(slow)] if slow else []), *notes])


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (lower latency, higher accuracy)."""
    keep = []
    for i, (li, ai) in enumerate(points):
        if not any((lj <= li and aj >= ai) and (lj < li or aj > ai) for lj, aj in points):
            keep.append(i)
    return keep


def extra_plots(run_dir: Path, models: dict[str, dict], save) -> dict[str, str]:
    import matplotlib.pyplot as plt

    out = {}
    # accuracy as that runtime measured it (an ExecuTorch int8 program is its own quantization)
    pts = [(name, rt, lat["p50_ms"], lat.get("top1", m.get("top1"))) for name, m in models.items()
           for rt, lat in (m.get("latency") or {}).items() if "p50_ms" in lat and lat.get("top1", m.get("top1")) is not None]
    if pts:
        # colour = model, marker = runtime; each model is labelled once, at its fastest point
        from matplotlib.lines import Line2D

        fig, ax = plt.subplots(figsize=(8, 4.8))
        names = list(dict.fromkeys(p[0] for p in pts))
        runtimes = sorted({p[1] for p in pts})
        colour = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
        marker = dict(zip(runtimes, "osD^v<>"))
        for name, rt, ms, top1 in pts:
            ax.scatter(ms, top1, marker=marker[rt], s=55, color=colour[name], edgecolors="k", linewidths=0.4, zorder=3)
        for n in names:
            _, _, ms, top1 = min((p for p in pts if p[0] == n), key=lambda p: p[2])
            ax.annotate(models[n].get("label", n), (ms, top1), fontsize=7, xytext=(5, 4), textcoords="offset points")
        front = sorted((pts[i] for i in pareto([(p[2], p[3]) for p in pts])), key=lambda p: p[2])
        ax.plot([p[2] for p in front], [p[3] for p in front], "k--", lw=1, zorder=2)
        handles = [Line2D([], [], ls="", marker=marker[r], color="0.5", label=r) for r in runtimes]
        handles.append(Line2D([], [], color="k", ls="--", lw=1, label="Pareto front"))
        ax.legend(handles=handles, fontsize=8, loc="lower right")
        ax.set_xscale("log")
        ax.set(xlabel="latency p50 (ms, log scale)", ylabel="top-1 % (as each runtime ran it)", title="Accuracy vs latency")
        save(fig, run_dir / "pareto.png")
        out["Accuracy vs latency"] = "pareto.png"
    from ..formats import FORMATS

    kinds = [(f.primary, f().figure("size_bytes"), "" if f.primary else f" ({f.suffix})") for _, f in FORMATS.items()]
    kinds.sort(key=lambda k: not k[0])
    sizes = [(f"{m.get('label', k)}{suffix}", m[key], i) for k, m in models.items()
             for i, (_, key, suffix) in enumerate(kinds) if m.get(key)]
    if sizes:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(sizes) + 1))
        names, vals, kind = zip(*sizes)
        bars = ax.barh(range(len(vals)), [v / 2**20 for v in vals], color=[plt.cm.Set2(i % 8) for i in kind])  # per format
        ax.set_yticks(range(len(vals)), names)
        ax.invert_yaxis()
        ax.bar_label(bars, fmt="%.2f MB", padding=3)
        ax.set_xscale("log")
        ax.set(xlabel="file size (MB, log scale)", title="Model file size")
        save(fig, run_dir / "size.png")
        out["Model size"] = "size.png"
    return out
