"""`edgekd` command line: run, validate, stages, check, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import EdgekdError

log = logging.getLogger("edgekd")


def _cmd_run(args) -> int:
    from . import dist
    from .config import load_pipeline
    from .runner import resolve_device

    cfg, raw = load_pipeline(args.pipeline, args.set)
    if dist.world().size > 1:  # under torchrun: rank 0 runs the pipeline, the others train with it
        device = dist.init(resolve_device(cfg.device))
        try:
            if not dist.world().main:
                dist.serve(cfg, device)
                return 0
            return _run_pipeline(args, cfg, raw)
        finally:
            dist.finish()
    return _run_pipeline(args, cfg, raw)


def _run_pipeline(args, cfg, raw) -> int:
    from .runner import Runner

    resume = args.resume is not None
    run_dir = Path(args.resume) if resume else (Path(args.out) if args.out else None)
    runner = Runner(cfg, raw, run_dir, resume=resume)
    print(f"run directory: {runner.run_dir}", file=sys.stderr)
    try:
        out = runner.run()
    except KeyboardInterrupt:
        print(f"edgekd: interrupted; continue with: edgekd run {args.pipeline} --resume {runner.run_dir}", file=sys.stderr)
        return 130
    import json

    report = json.loads((out / "report.json").read_text())
    print(report["headline"])
    print(f"report: {out / 'report.md'}")
    return 0


def _cmd_validate(args) -> int:
    from .config import load_pipeline

    cfg, _ = load_pipeline(args.pipeline, args.set)
    names = [n for n, _ in cfg.stage_entries()]
    print(f"{args.pipeline}: OK ({len(names)} stage{'s' if len(names) > 1 else ''}: {', '.join(names)})")
    return 0


def _type_name(ann) -> str:
    """Readable type: Literal values spelled out, Optional as `X | None`, models by name."""
    import types
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return "|".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list and args and typing.get_origin(args[0]) is typing.Annotated:  # objective: list of terms
        return "list[term]"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann).replace("typing.", ""))


def _describe(model_cls, indent: str = "    ") -> list[str]:
    from pydantic import BaseModel

    lines = []
    for name, f in model_cls.model_fields.items():
        desc = f" - {f.description}" if f.description else ""
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            lines.append(f"{indent}{name}:{desc}")
            lines += _describe(f.annotation, indent + "    ")
            continue
        default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
        lines.append(f"{indent}{name}: {_type_name(f.annotation)} ({default}){desc}")
    return lines


def _cmd_stages(args) -> int:
    from .distill import LOSSES
    from .stages import STAGES

    for name, cls in STAGES.items():
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        summary = doc[0].removeprefix(f"{name}:").strip() if doc else ""
        print(f"{name}: {summary}")
        print("\n".join(_describe(cls.Config)))
    print("losses (terms of a training objective: [{loss: NAME, weight: W, teacher: T, ...options}, ...]):")
    for name, cls in LOSSES.items():
        print(f"    {name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        print("\n".join(line for line in _describe(cls.Term, "        ") if not line.lstrip().startswith("loss:")))
    return 0


def _cmd_check(args) -> int:
    from .check import run_check

    return run_check(Path(args.report), Path(args.baseline), update=args.update_baseline, add_cpu=args.add_cpu_figures)


def _cmd_bench(args) -> int:
    from .bench.cli import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekd", description="Distill, prune, quantize, export and benchmark vision models for edge devices.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a pipeline")
    r.add_argument("pipeline")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    r.add_argument("--out", help="run directory (default: <output_dir>/<name>-<timestamp>)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR")
    r.set_defaults(fn=_cmd_run)
    v = sub.add_parser("validate", help="check a pipeline without running it")
    v.add_argument("pipeline")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(fn=_cmd_validate)
    s = sub.add_parser("stages", help="list stages and their options")
    s.set_defaults(fn=_cmd_stages)
    c = sub.add_parser("check", help="compare a report with a stored baseline (exit 1 on regression)")
    c.add_argument("report")
    c.add_argument("--baseline", required=True)
    what = c.add_mutually_exclusive_group()
    what.add_argument("--update-baseline", action="store_true", help="write the report's figures into the baseline")
    what.add_argument("--add-cpu-figures", action="store_true",
                      help="store the report's speed ratios for its CPU class, every other baseline figure as it is")
    c.set_defaults(fn=_cmd_check)
    b = sub.add_parser("bench", help="benchmark ONNX, ExecuTorch .pte or LiteRT .tflite models on the available runtimes")
    b.add_argument("models", nargs="+", help=".onnx, .pte or .tflite file(s); each runs on the listed runtimes of its format")
    b.add_argument("--runtime", default="onnxruntime", help="comma list: onnxruntime,openvino,executorch,litert or 'all'")
    b.add_argument("--threads", default="1", help="comma list of thread counts, e.g. 1,2")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--throughput-batch", type=int, default=32)
    b.add_argument("--runs", type=int, default=200)
    b.add_argument("--warmup", type=int, default=30)
    b.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (files of one runtime alternate)")
    b.add_argument("--data", help="ImageFolder dir, .tar.gz or .zip for accuracy (its test split), or the pipeline "
                                  "file that trained the model (its data section's test split: labels, test_split)")
    b.add_argument("--json", help="write results to this JSON file")
    b.add_argument("--image-size", type=int, help="input size where the file has no edgekd metadata")
    b.add_argument("--no-peak-memory", dest="peak_memory", action="store_false",
                   help="skip the peak-memory child process (about a second per model and runtime)")
    b.add_argument("--by-op", action="store_true",
                   help="where each file's time goes by kind of op, from each runtime's own profiler (onnxruntime, "
                        "OpenVINO, ExecuTorch; 1 thread, batch 1), and every file against the first one op for op")
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # edgekd's own progress at INFO; other libraries only warn (onnxruntime's quantizer logs every bias it
    # copies at INFO, on the root logger), unless -v asks for everything
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("edgekd").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for noisy in ("matplotlib", "PIL", "torch_pruning"):  # not even with -v
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except Exception as e:  # every failure is one line; -v shows the traceback
        if args.verbose:
            raise
        code, msg = _one_line(e)
        print(f"edgekd: error: {msg}", file=sys.stderr)
        return code


def _one_line(e: Exception) -> tuple[int, str]:
    """(exit code, message) for any failure: 2 for bad input, 1 for a failed run."""
    if isinstance(e, EdgekdError):
        return e.exit_code, str(e)
    if isinstance(e, RecursionError):
        return 2, "input nested too deeply to process (a pipeline, checkpoint or run file)"
    if isinstance(e, MemoryError):
        return 1, "out of memory"
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return 1, f"{where}{e.strerror or e}"
    first = (str(e).splitlines() or [""])[0][:300]
    return 1, f"internal error: {type(e).__name__}: {first} (run with -v for the traceback, and please report it)"


if __name__ == "__main__":
    sys.exit(main())
