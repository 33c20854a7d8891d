"""Which int8 program a format that plans its own int8 ships (ExecuTorch/XNNPACK, LiteRT, OpenVINO).

The quantize stage plans the ONNX files for onnxruntime or OpenVINO (quant.plan); ExecuTorch and
LiteRT quantize the model themselves (PT2E), with other kernels, so a plan measured on
onnxruntime says little about them: XNNPACK runs MobileNetV3's hardswish in int8, where
onnxruntime has to leave a float island, and on an AVX2-only CPU an all-int8 MobileNetV2
program was slower than its fp32 one. So with `quantize.plan: auto` each of these formats times
its own candidates, on its own runtime, against its own fp32 program of the same weights:

- `int8`: every op the format's quantizer knows;
- `quantize plan`: the same, with the modules the quantize stage kept fp32 left unannotated, so
  float (through each quantizer's node filter: pte_export, litert_export), when it kept any;
- `fp32`: no int8 at all.

OpenVINO has no quantizer of its own here: it chooses between the quantize stage's int8 ONNX
file (planned on `quantize.plan_runtime`) and the fp32 program (formats.openvino).

Of the int8 candidates at least MARGIN faster than the fp32 program, and agreeing with it as
verification will require (`export.ptq_min_agreement` on the verification images it decides
clearly), it keeps the fastest whose
top-1 on the judging split (validation, else test) stays within `quantize.max_drop_points` of
the fp32 program, or, where none does, the most accurate (`within_budget` false, as the quantize
stage's plan does); where none is faster, the fp32 program, saying why. Timing follows
quant.plan: 1 thread, batch 1, medians of interleaved rounds, on this machine's CPU (a phone's
ARM cores run other kernels again).

The candidates are written first, with every other file of the stage (formats.workers:
conversions side by side), and judged once all are written (`choose_int8`); except that the QAT
file's int8 candidates wait for the PTQ file's to be judged, and those whose PTQ twin ran slower
than the fp32 program are not written (`unwritten_twins`).

The export stage writes the quantize stage's plan record with what each format shipped
(`programs`) as its int8_plan.json, so a run pinned to that file (`quantize.plan:
<int8_plan.json>`) writes the same programs untimed (`untimed_program`), as its ONNX files repeat
the plan: the same int8 structure on every runtime, on any machine."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..quant.plan import MARGIN, PATTERN, fastest_int8, int8_losses, kind_comparison
from .base import ExportJob, Format, Variant

log = logging.getLogger("edgekd")
JUDGE_IMAGES = 1000  # at most this many judging images per candidate (programs run image by image)


def kept_modules(plan: dict) -> list[str]:
    """Module paths a quantize-stage plan (quant.plan.Plan.to_json) keeps fp32."""
    return sorted({*plan.get("fp32_blocks", {}), *plan.get("fp32_modules", {})})


def with_patterns(keep: list[str], plan: dict) -> list[str]:
    """`keep` and the user's keep_fp32 patterns of `plan` (quant.plan.in_modules matches them as the
    ONNX plan does): they stay fp32 in every program, as in every plan."""
    return list(dict.fromkeys([*keep, *(PATTERN + p for p in plan.get("keep_fp32", []))]))


def int8_candidates(fmt: Format, v: Variant, path: Path, plan: dict, plan_name: str
                    ) -> dict[str, tuple[Variant, list[str] | None, Path]]:
    """The programs `v`'s int8 file for `fmt` is chosen from (Format.int8_choices): name -> (the
    variant to write, the modules it keeps float, or None for no int8 at all, and a temporary
    path beside `path`)."""
    keep = fmt.int8_choices(kept_modules(plan), plan_name)
    return {name: _program(fmt, v, path, i, None if k is None else with_patterns(k, plan))
            for i, (name, k) in enumerate(keep.items())}


def _program(fmt: Format, v: Variant, path: Path, i: int, keep: list[str] | None
             ) -> tuple[Variant, list[str] | None, Path]:
    """One program to write for `v`'s int8 file: the variant (its float source where `keep` is None:
    no int8 at all), the modules left float, and its temporary path beside `path`."""
    stem = path.name[: -len(fmt.suffix)]
    return Variant(v.name, v.int8_source) if keep is None else v, keep, path.with_name(f".{stem}.plan{i}{fmt.suffix}")


def untimed_program(fmt: Format, v: Variant, path: Path, quant_plan: dict
                    ) -> dict[str, tuple[Variant, list[str] | None, Path]]:
    """The one program `v`'s int8 file for `fmt` is where the plan is not timed here (`plan: int8`,
    or pinned), in int8_candidates' shape: what the pinned run's format shipped (its int8_plan.json
    `programs`), else the plan's fp32 modules left float."""
    shipped, plan = quant_plan.get("programs", {}).get(fmt.key, {}).get(v.name), quant_plan["plan"]
    if shipped:  # with this run's keep_fp32 patterns too (they are in the pinned plan)
        keep = None if shipped["fp32_modules"] == "all" else with_patterns(shipped["fp32_modules"], plan)
        name = "fp32" if keep is None else shipped["program"]
    else:
        kept = kept_modules(plan)
        name, keep = f"quantize plan ({quant_plan['chosen']})" if kept else "int8", with_patterns(kept, plan)
    return {name: _program(fmt, v, path, 0, keep)}


def ship_untimed(fmt: Format, v: Variant, path: Path, files: dict[str, tuple[list[str] | None, Path]],
                 quant_plan: dict) -> tuple[Path, dict]:
    """Move the one written program of `untimed_program` to `path`; returns the path and its record."""
    (name, (keep, tmp)), = files.items()
    os.replace(tmp, path)
    source = (f"pinned: {quant_plan.get('pinned_from', 'an earlier run')}" if quant_plan.get("mode") == "pinned"
              else f"quantize.plan: {quant_plan.get('mode')}")
    rec = {"chosen": name, "runtime": fmt.runtime, "timed": False, "fp32_modules": "all" if keep is None else keep,
           "source": source}
    if keep is None:
        rec["verdict"] = f"{v.name}{fmt.suffix} is the fp32 program of the same weights, as the plan it follows says ({source})"
    return path, rec


def program(rec: dict) -> dict:
    """What a format's int8 record (choose_int8, ship_untimed) says it shipped, for int8_plan.json
    `programs`: the candidate's name and the modules it leaves float ("all": the fp32 program)."""
    if "candidates" in rec:
        chosen = next(c for c in rec["candidates"] if c["plan"] == rec["chosen"])
        return {"program": rec["chosen"], "fp32_modules": chosen["fp32_modules"], "timed": True,
                "speedup_vs_fp32": chosen["speedup_vs_fp32"]}
    return {"program": rec["chosen"], "fp32_modules": rec["fp32_modules"], "timed": False}


def unwritten_twins(cands: dict, twin_name: str, twin_rec: dict) -> dict[str, dict]:
    """Of a QAT file's candidates `cands` (int8_candidates), the int8 programs not worth writing:
    those whose twin in the PTQ file `twin_name` (its record `twin_rec`, from choose_int8: the
    program of the same name) ran slower than its fp32 program. The same quantizer annotates the
    same ops in both, so the programs have one structure and differ in scales and values only,
    which int8 kernels do not run faster or slower; such a QAT program could not pay either, and
    an ExecuTorch or LiteRT int8 conversion takes tens of seconds on a slow CPU. Returns name ->
    its row for the record (choose_int8's `not_written`), with the twin's speed-up."""
    twins = {c["plan"]: c for c in twin_rec["candidates"]}
    return {name: {"plan": name, "fp32_modules": keep, "p50_ms": None, "speedup_vs_fp32": twins[name]["speedup_vs_fp32"],
                   "top1": None, "drop_points": None, "agreement_vs_fp32": None,
                   "not_written": f"{twin_name}'s program of the same structure ran at "
                                  f"{twins[name]['speedup_vs_fp32']}x the fp32 speed"}
            for name, (_, keep, _) in cands.items()
            if keep is not None and name in twins and twins[name]["speedup_vs_fp32"] < 1.0}


def choose_int8(fmt: Format, v: Variant, path: Path, files: dict[str, tuple[list[str] | None, Path]], job: ExportJob,
                max_drop: float, not_written: dict[str, dict] | None = None, twin: tuple[str, dict] | None = None
                ) -> tuple[Path, dict]:
    """Time and judge the written candidates `files` (name -> (modules kept float, file)) of
    `v`'s int8 file for `fmt` (see the module docstring), move the chosen one to `path` and
    remove the others; returns the path and the record (candidates with p50, speed-up, top-1,
    and the int8 program against the fp32 one by kind of op, where the runtime profiles ops).
    `not_written`: candidates left unwritten (unwritten_twins), listed with their twin's speed-up;
    `twin`: that PTQ file's name and record, whose op-by-op comparison stands for the unwritten
    programs' (the same structure)."""
    from ..bench.measure import round_ratio, runs_within, time_interleaved
    from ..onnx_export import compare_logits, judged_agreement, verification_images

    data = job.data
    split = (data.val if data.val is not None else data.test).sample(JUDGE_IMAGES)
    try:
        if len(files) > 1:
            x, y = data.normalize(split.images[:]).numpy(), split.labels.numpy()
            runners = {name: fmt.runner(f, 1) for name, (_, f) in files.items()}
            timed = time_interleaved(runners, x[:1], 10, runs_within(runners["fp32"], x[:1], 1000.0), 10)
            top1 = {name: round(100.0 * float((np.asarray(r(x)).argmax(1) == y).mean()), 3) for name, r in runners.items()}
            # and on the images verification will judge the shipped file on
            xv = verification_images(data, job.verify_images)
            outs = {name: np.asarray(r(xv)) for name, r in runners.items()}
            rows = [{"plan": name, "fp32_modules": "all" if keep is None else keep, "p50_ms": timed[name]["p50_ms"],
                     "speedup_vs_fp32": round_ratio(timed["fp32"], timed[name]), "top1": top1[name],
                     "drop_points": round(top1["fp32"] - top1[name], 3),
                     "agreement_vs_fp32": judged_agreement(compare_logits(outs["fp32"], outs[name]))}
                    for name, (keep, _) in files.items()]
        else:  # every int8 candidate was left unwritten: nothing to time the fp32 program against
            rows = [{"plan": "fp32", "fp32_modules": "all", "p50_ms": None, "speedup_vs_fp32": 1.0, "top1": None,
                     "drop_points": 0.0, "agreement_vs_fp32": None}]
        # in int8_choices' order: every op int8, the plan's, none
        rows = sorted([*rows, *(not_written or {}).values()], key=lambda r: (r["plan"] == "fp32", r["plan"] != "int8"))
        # a program verification would reject (its top-1 agreement with the float program) is no candidate
        passes = lambda r: r["agreement_vs_fp32"] is None or r["agreement_vs_fp32"] >= job.int8_min_agreement  # noqa: E731
        paying = [r for r in rows if r["plan"] != "fp32" and r["p50_ms"] is not None
                  and r["speedup_vs_fp32"] >= 1 + MARGIN and passes(r)]
        within = [r for r in paying if r["drop_points"] <= max_drop]
        chosen = (max(within, key=lambda r: r["speedup_vs_fp32"]) if within else max(paying, key=lambda r: r["top1"]) if paying
                  else next(r for r in rows if r["plan"] == "fp32"))
        by_op = _by_op(fmt, files, rows, chosen, x[:1]) if len(files) > 1 else _twin_by_op(*twin) if twin else {}
        os.replace(files[chosen["plan"]][1], path)
    finally:
        for _, f in files.values():
            f.unlink(missing_ok=True)
    rec = {"chosen": chosen["plan"], "runtime": fmt.runtime, "judged_on": f"{'val' if data.val is not None else 'test'} "
           f"({len(split)} images)", "max_drop_points": max_drop, "within_budget": chosen["drop_points"] <= max_drop,
           "candidates": rows, **by_op}
    if chosen["plan"] == "fp32":
        best = fastest_int8(rows)
        # a QAT file whose int8 programs were not written: its PTQ twin's verdict, logged already, says why
        follows = "not_written" in best and twin is not None and "verdict" in twin[1]
        if follows:
            why = (f"int8 does not pay on {fmt.runtime} here for {v.name} either: {best['not_written']} and its own "
                   "int8 programs were not written")
        elif "not_written" in best:
            why = (f"int8 does not pay on {fmt.runtime} here: {best['not_written']} (the fastest: {best['plan']}); "
                   f"{v.name}'s int8 programs were not written")
        elif best["speedup_vs_fp32"] >= 1 + MARGIN and not passes(best):
            why = (f"the fastest int8 program ({best['plan']}, {best['speedup_vs_fp32']}x) agrees with the fp32 program on "
                   f"only {best['agreement_vs_fp32']:.1%} of the images it decides clearly (verification needs "
                   f"{job.int8_min_agreement:.0%}: export.ptq_min_agreement)")
        else:
            why = (f"int8 does not pay on {fmt.runtime} here: the best int8 program ({best['plan']}) ran at "
                   f"{best['speedup_vs_fp32']}x the fp32 speed with top-1 {best['top1']} vs {top1['fp32']}")
        if by_op.get("int8_loses_time_on", "nothing") != "nothing" and why.startswith("int8 does not pay") and not follows:
            why += f"; {by_op['by_op_program']} loses time on {by_op['int8_loses_time_on']}"
        rec["verdict"] = f"{why}, so {v.name}{fmt.suffix} is the fp32 program of the same weights"
        log.log(logging.INFO if follows else logging.WARNING, "export: %s", rec["verdict"])  # one warning per runtime
    return path, rec


def _by_op(fmt: Format, files: dict[str, tuple[list[str] | None, Path]], rows: list[dict], chosen: dict,
           x: np.ndarray) -> dict:
    """The shipped int8 program, or where none ships the fastest one, against the fp32 program kind
    of op by kind of op on the format's runtime (Format.op_profile, quant.plan.kind_comparison):
    which int8 kernels gain and which lose time on this CPU, as the quantize stage says for the
    ONNX file. {} where the runtime has no per-operator profiler."""
    written = [r for r in rows if r["plan"] != "fp32" and r["p50_ms"] is not None]
    if not written or "fp32" not in files:
        return {}
    pick = chosen if chosen["plan"] != "fp32" else max(written, key=lambda r: r["speedup_vs_fp32"])
    try:  # an explanation, not a result: a profiler that fails costs the table, not the export
        int8 = fmt.op_profile(files[pick["plan"]][1], x)
        fp32 = fmt.op_profile(files["fp32"][1], x) if int8 is not None else None
    except Exception as e:
        log.warning("export: %s's per-operator profile failed (%s: %s); no op-by-op table for it", fmt.runtime,
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return {}
    if int8 is None or fp32 is None:
        return {}
    by_op = kind_comparison(fp32, int8)
    return {"by_op_program": pick["plan"], "int8_vs_fp32_by_op": by_op, "int8_loses_time_on": int8_losses(by_op)}


def _twin_by_op(twin_name: str, twin_rec: dict) -> dict:
    """For a QAT file whose int8 programs were all left unwritten (unwritten_twins): its PTQ twin's
    op-by-op comparison (_by_op), the same structure, so the same kernels gain and lose time."""
    if "int8_vs_fp32_by_op" not in twin_rec:
        return {}
    return {"by_op_program": f"{twin_name}'s {twin_rec['by_op_program']}", "by_op_of": twin_name,
            **{k: twin_rec[k] for k in ("int8_vs_fp32_by_op", "int8_loses_time_on")}}
