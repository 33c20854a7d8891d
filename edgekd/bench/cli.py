"""`edgekd bench MODEL.onnx|MODEL.pte|MODEL.tflite ...`: the benchmark stage's measurements for any file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import EdgekdError
from ..fileio import write_json
from .machine import isa_text, machine_info
from .measure import bench_models, round_ratio
from .runtimes import RUNTIMES, resolve

log = logging.getLogger("edgekd")


def _meta(path: Path, image_size: int | None) -> dict:
    """Preprocessing metadata (as the file's format stores it) and input size."""
    from ..formats import format_for

    fmt = format_for(path)()
    props = fmt.read_metadata(path)
    shape = [] if image_size or "edgekd.input_size" in props else fmt.input_shape(path)
    if len(shape) == 4 and shape[3] == 3 and shape[1] != 3:  # an NHWC file
        shape = [shape[0], shape[3], shape[1], shape[2]]
    size = image_size or (json.loads(props["edgekd.input_size"])[-1] if "edgekd.input_size" in props else
                          shape[-1] if shape and shape[-1] > 0 else None)
    if size is None:
        raise EdgekdError(f"{path}: no input size in the file's metadata; pass --image-size")
    return {"image_size": int(size), "props": props, "fmt": fmt.key}


def _eval_data(source: str, props: dict, image_size: int):
    from ..schema import DataConfig
    from ..data import load_data

    base, seed = {"source": source}, 0
    if source.lower().endswith((".yaml", ".yml")):  # a pipeline: its own test split (labels, test_split, subsets)
        from ..config import load_pipeline

        cfg, _ = load_pipeline(source)
        base, seed = cfg.data.model_dump(exclude={"store_size"}), cfg.seed
    kw = {**base, "image_size": image_size}  # the file's own input and preprocessing win
    if props.get("edgekd.resize") == "short_side_centre_crop":  # the evaluation crop the model was trained for
        kw["store_size"] = max(image_size, int(props.get("edgekd.resize_short", image_size)))
    if "edgekd.mean" in props:
        kw.update(mean=tuple(json.loads(props["edgekd.mean"])), std=tuple(json.loads(props["edgekd.std"])))
    data = load_data(DataConfig(**kw), seed=seed)
    return data.normalize(data.test.images[:]).numpy(), data.test.labels.numpy()


def run_bench(args) -> int:
    runtimes = resolve(args.runtime)
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    files, metas, evals = {}, {}, {}
    for model in args.models:
        path = Path(model)
        if not path.is_file():
            raise EdgekdError(f"{path}: file not found")
        name = path.stem if path.stem not in files else str(path)
        files[name], metas[name] = path, _meta(path, args.image_size)
        if args.data:
            evals[name] = _eval_data(args.data, metas[name]["props"], metas[name]["image_size"])
    results = []
    for rt in runtimes:
        runtime = RUNTIMES.get(rt)
        why = runtime.available()
        mine = {n: p for n, p in files.items() if metas[n]["fmt"] in (runtime.fmt, *runtime.also)}
        if not why and not mine:
            why = f"runs {' or '.join((runtime.fmt, *runtime.also))} files, none given"
        if why:
            print(f"skip {rt}: {why}")
            continue
        prep = lambda n: (metas[n]["image_size"], metas[n]["props"].get("edgekd.mean"), metas[n]["props"].get("edgekd.std"))  # noqa: E731
        for key in dict.fromkeys(prep(n) for n in mine):  # models with the same input are timed together
            group = {n: p for n, p in mine.items() if prep(n) == key}
            size = key[0]
            x, y = evals.get(next(iter(group)), (None, None))
            for t in threads:
                def fail(name, e, rt=rt):
                    if isinstance(e, EdgekdError):
                        raise e
                    raise EdgekdError(f"{files[name]} on {rt}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None

                res = bench_models(group, rt, t, size, args.batch, args.throughput_batch, args.warmup, args.runs,
                                   args.rounds, x, y, peak_memory=args.peak_memory, on_error=fail)
                results += [{"model": str(files[n]), **r} for n, r in res.items()]
    mi = machine_info()
    print(f"# {mi['cpu']} ({isa_text(mi)}), {mi['cores']} cores")
    print(f"{'model':40s} {'runtime':12s} {'thr':>3s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s} {'img/s@b':>10s} {'peak MB':>8s} {'top-1':>7s}")
    for r in results:
        top1 = f"{r['top1']:.2f}" if "top1" in r else "–"
        peak = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "–"
        print(f"{Path(r['model']).name[:40]:40s} {r['runtime']:12s} {r['threads']:>3d} {r['p50_ms']:9.3f} {r['p90_ms']:9.3f} "
              f"{r['p99_ms']:9.3f} {r['throughput_ips']:10.1f} {peak:>8s} {top1:>7s}")
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            if r["runtime"] == base["runtime"] and r["threads"] == base["threads"]:
                print(f"ratio {Path(base['model']).name} / {Path(r['model']).name} on {r['runtime']}/{r['threads']}t: "
                      f"{round_ratio(base, r):.2f}x (median of {r.get('rounds', 1)} interleaved rounds)")
    by_op = _by_op(files, metas, runtimes) if args.by_op else {}
    if args.json:
        write_json(args.json, {"machine": mi, "results": results, **({"by_op": by_op} if args.by_op else {})})
    return 0


def _by_op(files: dict[str, Path], metas: dict, runtimes: list[str]) -> dict:
    """`--by-op`: each file's microseconds per image by kind of op on each runtime that profiles
    its operators (bench.runtimes.Runtime.op_profile), printed as one table per runtime with every
    file after the first set against it (quant.plan.kind_comparison: an int8 file against its fp32
    file). Returns {runtime: {file: profile}} for the JSON."""
    from ..quant.plan import int8_losses, kind_comparison

    out = {}
    for rt in runtimes:
        runtime = RUNTIMES.get(rt)
        mine = {n: p for n, p in files.items() if metas[n]["fmt"] in (runtime.fmt, *runtime.also)}
        if runtime.available() or not mine:
            continue
        x = lambda n: np.random.default_rng(0).random((1, 3, metas[n]["image_size"], metas[n]["image_size"]),  # noqa: E731
                                                      dtype=np.float32)
        profs = {n: runtime().op_profile(p, x(n)) for n, p in mine.items()}
        if any(p is None for p in profs.values()):
            print(f"by op on {rt}: its runtime has no per-operator profiler")
            continue
        out[rt] = {str(mine[n]): p for n, p in profs.items()}
        names = list(profs)
        kinds = list(dict.fromkeys(k for p in profs.values() for k in p))
        print(f"\n# by kind of op on {rt} (its profiler; microseconds per image, 1 thread, batch 1; operators in brackets)")
        print(f"{'ops':24s}" + "".join(f" {Path(mine[n]).name[:22]:>22s}" for n in names))
        for k in kinds:
            cells = [f"{profs[n][k]['us']:g} ({profs[n][k]['nodes']})" if k in profs[n] else "–" for n in names]
            print(f"{k[:24]:24s}" + "".join(f" {c:>22s}" for c in cells))
        for n in names[1:]:
            losses = int8_losses(kind_comparison(profs[names[0]], profs[n]))
            print(f"{Path(mine[n]).name} against {Path(mine[names[0]]).name} on {rt}: "
                  + ("no kind of op slower" if losses == "nothing" else f"slower on {losses}"))
    return out
