"""The report's per-class, robustness and calibration sections: which classes compression cost,
what the compressed models do on corrupted images (edgekd.robustness) and how far their softmax
can be trusted (edgekd.calibration), as tables and plots for report.md."""

from __future__ import annotations

from pathlib import Path


def _label(models: dict, name: str) -> str:
    return models[name].get("label", name)


PER_CLASS_ROWS = 20  # the classes that lost most; report.json holds every class


def per_class_markdown(models: dict[str, dict]) -> list[str]:
    """Recall per class of every model measured on the test split (not the untrained input), the
    classes that lost most against the teacher first: a top-1 that moved a point can hide a class
    that lost twenty, and on a user's own data some classes matter more than others."""
    cols: list[str] = []
    for k, m in models.items():  # a model handed on unchanged (the pruned student as the quantize input) shown once
        if isinstance(m.get("per_class"), dict) and k != "student_input" and \
                not (cols and m["per_class"] == models[cols[-1]]["per_class"]):
            cols.append(k)
    if len(cols) < 2:
        return []
    classes = list(models[cols[0]]["per_class"])
    ref = "teacher" if "teacher" in cols else cols[0]

    def recall(k: str, c: str) -> float | None:
        v = models[k]["per_class"].get(c)
        return None if v is None else 100 * v["recall"]

    change = {c: (recall(cols[-1], c) or 0) - (recall(ref, c) or 0) for c in classes}
    shown = sorted(classes, key=lambda c: change[c])[:PER_CLASS_ROWS]
    L = ["", "## Per class", "",
         f"Recall % on the test split per class, the classes that lost most from {_label(models, ref)} to "
         f"{_label(models, cols[-1])} first" + (f" ({PER_CLASS_ROWS} of {len(classes)}; report.json has every class)"
                                                 if len(classes) > PER_CLASS_ROWS else "") + ".", "",
         "| class | images | " + " | ".join(_label(models, k) for k in cols) + " | change |", "|" + "---|" * (len(cols) + 3)]
    for c in shown:
        cells = ["–" if recall(k, c) is None else f"{recall(k, c):.1f}" for k in cols]
        L.append(f"| {c} | {models[ref]['per_class'][c]['support']} | " + " | ".join(cells) + f" | {change[c]:+.1f} |")
    return L


def quality_markdown(models: dict[str, dict]) -> list[str]:
    L: list[str] = per_class_markdown(models)
    robust = {k: m["robustness"] for k, m in models.items() if isinstance(m.get("robustness"), dict)}
    if robust:
        first = next(iter(robust.values()))
        corr = list(first["by_corruption"])
        sev = list(first["by_severity"])
        L += ["", "## Robustness", "",
              f"Top-1 % on {first['images']} test images with each corruption (CIFAR-10-C style, severities "
              f"{', '.join(map(str, sev))}, averaged), as onnxruntime runs each file; drop = clean - mean corrupted"
              + (", vs teacher = the drop beyond the teacher's" if any("drop_vs_teacher_points" in r for r in robust.values()) else "")
              + ".", "",
              "| model | clean | corrupted | drop | vs teacher | " + " | ".join(c.replace("_", " ") for c in corr) + " |",
              "|" + "---|" * (5 + len(corr))]
        for k, r in robust.items():
            per = [f"{sum(r['by_corruption'][c].values()) / len(sev):.1f}" for c in corr]
            vs = r.get("drop_vs_teacher_points")
            L.append(f"| {_label(models, k)} | {r['clean_top1']:.2f} | {r['corruption_top1']:.2f} | {r['drop_points']:.2f} | "
                     f"{'–' if vs is None else f'{vs:+.2f}'} | " + " | ".join(per) + " |")
    cal = {k: m["calibration"] for k, m in models.items() if isinstance(m.get("calibration"), dict)}
    if cal:
        L += ["", "## Calibration", "",
              "Softmax temperature fit per file on the validation split (held out from training), stored in the file's "
              "metadata as `edgekd.temperature`; ECE on the test split (15 bins). Top-1 is unchanged by construction.", "",
              "| model | temperature | ECE before | ECE after | validation images |", "|---|---|---|---|---|"]
        for k, c in cal.items():
            L.append(f"| {_label(models, k)} | {c['temperature']:.3f} | {c['ece_before']:.4f} | {c['ece_after']:.4f} | "
                     f"{c['val_images']} |")
        by_note: dict[str, list[str]] = {}  # one line per reason, naming the files it holds for
        for k, c in cal.items():
            if c.get("note"):
                by_note.setdefault(c["note"], []).append(_label(models, k))
        L += [""] + [f"- {', '.join(names)}: temperature {note}." for note, names in by_note.items()] if by_note else []
    return L


def final_student(models: dict[str, dict]) -> str | None:
    return next((k for k in ("int8_qat", "int8_ptq", "student_fp32") if isinstance(models.get(k, {}).get("calibration"), dict)), None)


def quality_plots(run_dir: Path, models: dict[str, dict], save) -> dict[str, str]:
    import matplotlib.pyplot as plt

    out = {}
    robust = {k: m["robustness"] for k, m in models.items() if isinstance(m.get("robustness"), dict)}
    if robust:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for k, r in robust.items():
            sev = [int(s) for s in r["by_severity"]]
            ax.plot([0] + sev, [r["clean_top1"]] + list(r["by_severity"].values()), marker="o", label=_label(models, k))
        ax.set_xticks([0] + [int(s) for s in next(iter(robust.values()))["by_severity"]])
        ax.set(xlabel="corruption severity (0 = clean)", ylabel="top-1 % (mean over corruptions)",
               title="Accuracy under corruption")
        ax.legend(fontsize=8)
        save(fig, run_dir / "robustness.png")
        out["Accuracy under corruption"] = "robustness.png"
    final = final_student(models)
    if final:
        c = models[final]["calibration"]
        fig, ax = plt.subplots(figsize=(5, 4.6))
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for key, label, colour in (("reliability_before", f"T = 1, ECE {c['ece_before']:.3f}", "#c44e52"),
                                   ("reliability_after", f"T = {c['temperature']:.2f}, ECE {c['ece_after']:.3f}", "#4c72b0")):
            pts = [(x, y) for x, y in zip(c[key]["confidence"], c[key]["accuracy"]) if x is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colour, label=label)
        ax.set(xlabel="confidence (max softmax)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
               title=f"Reliability: {_label(models, final)}")
        ax.legend(fontsize=8, loc="upper left")
        save(fig, run_dir / "reliability.png")
        out["Reliability diagram"] = "reliability.png"
    return out
