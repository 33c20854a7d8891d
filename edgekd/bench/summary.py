"""Headline sentence, latency table columns and the benchmark plots of the report."""

from __future__ import annotations

from pathlib import Path


def _p50(m: dict, runtime: str) -> float | None:
    return ((m.get("latency") or {}).get(runtime) or {}).get("p50_ms")


def latency_columns(models: dict[str, dict]) -> tuple[list[str], dict]:
    runtimes: list[str] = []
    cells = {}
    for name, m in models.items():
        for rt, lat in (m.get("latency") or {}).items():
            if rt not in runtimes:
                runtimes.append(rt)
            if "p50_ms" in lat:
                cells[(name, rt)] = f"{lat['p50_ms']:.2f}"
    return runtimes, cells


def _pick(models: dict[str, dict], prefix: str) -> str | None:
    cands = [k for k, m in models.items() if k.startswith(prefix) and "top1" in m and m.get("latency")]
    return max(cands, key=lambda k: models[k]["top1"]) if cands else None


def headline_sentence(models: dict[str, dict]) -> str:
    """'student int8: 12.3x faster than teacher, 38x smaller, -2.1 points' (plus int8 vs fp32)."""
    final = _pick(models, "int8") or _pick(models, "student") or _pick(models, "pruned")
    teacher = models.get("teacher_fp32") or models.get("teacher")
    if not final:
        best = max((k for k in models if "top1" in models[k] and k != "teacher"), key=lambda k: models[k]["top1"], default=None)
        if best is None:
            return "no student figures"
        tail = f" ({models[best]['top1'] - teacher['top1']:+.2f} points vs teacher)" if teacher and "top1" in teacher else ""
        return f"{models[best].get('label', best)}: top-1 {models[best]['top1']:.2f} %{tail}; no latency measured"
    m = models[final]
    rt = next(iter(m["latency"]))
    parts = []
    if teacher and _p50(teacher, rt):
        parts.append(f"{_p50(teacher, rt) / _p50(m, rt):.1f}x faster than teacher")
    if teacher and teacher.get("size_bytes") and m.get("size_bytes"):
        parts.append(f"{teacher['size_bytes'] / m['size_bytes']:.0f}x smaller")
    if teacher and "top1" in teacher:
        parts.append(f"{m['top1'] - teacher['top1']:+.1f} points")
    text = f"{m.get('label', final)}: " + ", ".join(parts) + f" ({rt})"
    fp32 = models.get("student_fp32")
    if final.startswith("int8") and fp32 and _p50(fp32, rt):
        ratio = _p50(fp32, rt) / _p50(m, rt)
        text += (f"; int8 is {ratio:.2f}x the speed of the fp32 student" if ratio >= 1.1
                 else f"; NOTE: int8 is not faster than the fp32 student here ({ratio:.2f}x)")
    return text


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
    pts = [(name, rt, lat["p50_ms"], m["top1"]) for name, m in models.items() if "top1" in m
           for rt, lat in (m.get("latency") or {}).items() if "p50_ms" in lat]
    if pts:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        runtimes = sorted({p[1] for p in pts})
        for rt, marker in zip(runtimes, "osD^v<>"):
            sel = [p for p in pts if p[1] == rt]
            ax.scatter([p[2] for p in sel], [p[3] for p in sel], marker=marker, s=50, label=rt)
            for p in sel:
                ax.annotate(models[p[0]].get("label", p[0]), (p[2], p[3]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = sorted((pts[i] for i in pareto([(p[2], p[3]) for p in pts])), key=lambda p: p[2])
        ax.plot([p[2] for p in front], [p[3] for p in front], "k--", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set(xlabel="latency p50 (ms, log scale)", ylabel="top-1 %", title="Accuracy vs latency")
        ax.legend(fontsize=8)
        save(fig, run_dir / "pareto.png")
        out["Accuracy vs latency"] = "pareto.png"
    sizes = [(m.get("label", k), m["size_bytes"]) for k, m in models.items() if m.get("size_bytes")]
    if sizes:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(sizes) + 1))
        names, vals = zip(*sizes)
        bars = ax.barh(range(len(vals)), [v / 2**20 for v in vals], color="#dd8452")
        ax.set_yticks(range(len(vals)), names)
        ax.invert_yaxis()
        ax.bar_label(bars, fmt="%.2f MB", padding=3)
        ax.set_xscale("log")
        ax.set(xlabel="file size (MB, log scale)", title="Model file size")
        save(fig, run_dir / "size.png")
        out["Model size"] = "size.png"
    return out
