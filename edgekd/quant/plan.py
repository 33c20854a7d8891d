"""A quantization plan: which blocks of the model run int8 and which stay fp32, and why.

One global recipe ("quantize every op the quantizer knows") is right for MobileNetV2 on a VNNI
CPU and wrong elsewhere: onnxruntime has no int8 kernel for hardswish / hardsigmoid, so in a
MobileNetV3 every such activation between two int8 convs costs a dequantize, a float op, a
quantize and a QLinearMul, where the fp32 graph fuses the activation into the conv; and a block
whose tensors are tiny (late layers at 1x1 or 2x2) pays more in Q/DQ than its int8 conv saves.
Which of these wins depends on the architecture, the input size, the runtime and the CPU, so
the plan is measured, not guessed (NNCF's ignored scope, chosen by timing instead of by hand):

- fixed rules first: the stem conv (raw pixels, 3 input channels) and the user's
  `quantize.keep_fp32` patterns (op types or fnmatch patterns on ONNX node names or module
  paths) stay fp32;
- `plan: auto` then visits the blocks one by one (a block is a module path up to its first
  index: `features.3`, `layer1.0`, `blocks.2`, `classifier`) and keeps a block fp32 when the
  file with it in fp32 is faster on the runtime the files are planned for (onnxruntime by
  default, or OpenVINO, which runs the same ONNX files) than the file without (interleaved timing,
  1 thread, batch 1, medians of rounds; a margin against noise); where that still leaves the
  file slower than fp32, it builds up from every block fp32 instead (`search`);
- every plan kept on the way is a candidate; the stage keeps the fastest whose top-1 stays
  within `quantize.max_drop_points` of fp32 (`choose`), and where none does, keeps fp32 the
  blocks whose int8 costs the most accuracy (`recover_accuracy`).

Blocks are named by module path, so the same plan applies to the PTQ graph, to the QAT graph
of the same model (BN folded in PyTorch, the same node scopes) and to QAT's fake-quant wrapping
(quant.qat.wrap_qat skips the modules the plan keeps fp32): QAT follows the plan."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

WEIGHTED = ("Conv", "Gemm", "MatMul", "ConvTranspose")
MARGIN = 0.03  # a plan (or program) must be this much faster than another to count as faster
STEM_REASON = "stem conv: raw pixels in, 3 input channels (quantize.keep_first_conv_fp32)"


def module_path(node) -> str:
    """The PyTorch module a node of a TorchScript-exported graph came from. Its scope
    `/features/features.1/block/block.1/fc1/Conv` names each level by the attribute that holds it,
    a container's children as `<container>.<index>`: the path is `features.1.block.1.fc1`."""
    parts = [p for p in node.name.split("/") if p][:-1]
    path: list[str] = []
    for p in parts:
        if path and p.startswith(path[-1] + "."):
            path[-1] = p
        else:
            path.append(p)
    return ".".join(path)


PATTERN = "keep_fp32:"  # marks one of the user's patterns among the module paths a PT2E quantizer leaves float

# torch.export's aten ops as the ONNX op types the TorchScript exporter gives them, so that an op-type
# pattern of quantize.keep_fp32 (`HardSigmoid`, `Mul`) names the same ops in a PT2E graph
ONNX_OP_OF_ATEN = {"conv1d": "Conv", "conv2d": "Conv", "convolution": "Conv", "linear": "Gemm", "addmm": "Gemm",
                   "matmul": "MatMul", "mm": "MatMul", "bmm": "MatMul", "add": "Add", "sub": "Sub", "mul": "Mul",
                   "div": "Div", "relu": "Relu", "hardtanh": "Clip", "clamp": "Clip", "sigmoid": "Sigmoid",
                   "hardsigmoid": "HardSigmoid", "hardswish": "HardSwish", "cat": "Concat",
                   "adaptive_avg_pool2d": "GlobalAveragePool", "mean": "ReduceMean", "max_pool2d": "MaxPool",
                   "avg_pool2d": "AveragePool", "flatten": "Flatten", "reshape": "Reshape", "view": "Reshape"}


def onnx_op_type(node) -> str:
    """The ONNX op type of a torch.export graph node (ONNX_OP_OF_ATEN; in-place ops as their
    out-of-place op), or '' for an op the table does not know."""
    name = getattr(node.target, "_opname", "") or ""
    return ONNX_OP_OF_ATEN.get(name.rstrip("_"), "")


def onnx_node_name(path: str, op_type: str) -> str:
    """The name the TorchScript exporter gives an op of the module at `path` (module_path's
    inverse): `features.1.conv.0` and Conv give `/features/features.1/conv/conv.0/Conv`."""
    scope: list[str] = []
    for part in path.split(".") if path else []:
        scope.append(f"{scope[-1]}.{part}" if part.isdigit() and scope else part)
    return "/" + "/".join([*scope, op_type or "*"])


def in_modules(node, keep) -> bool:
    """Whether a node of a torch.export graph (PT2E quantizers annotate these) stays float: it was
    traced inside one of the modules at the module paths in `keep` (a plan's blocks and modules), or
    one of the user's keep_fp32 patterns in `keep` (PATTERN + the pattern) matches it as it matches
    the ONNX graph (an op type, or fnmatch on its module path or ONNX node name). How ExecuTorch's
    and LiteRT's own int8 follow a plan."""
    stack = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
    path, op = stack[-1] if stack else "", onnx_op_type(node)
    for k in keep:
        if k.startswith(PATTERN):
            pattern = k[len(PATTERN):]
            if (op == pattern if _is_op_type(pattern) else
                    fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(onnx_node_name(path, op), pattern)):
                return True
        elif any(p == k or p.startswith(k + ".") for p in stack):
            return True
    return False


INDEXED = re.compile(r"[A-Za-z_]\w*-\d+")  # a name with an index: RegNet's block1-0


def block_of(path: str) -> str:
    """The block a module path belongs to: its components up to the first index (`features.3`,
    `layer1.0`, `blocks.2`, torchvision RegNet's `trunk_output.block1.block1-0`), or the first
    component where none is an index (`classifier`, `fc`). Without RegNet's `-0` the first index
    is a conv's inside its ConvNormActivation, and a RegNet had one block per conv: 82 of them,
    each timed twice by the plan search."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit() or INDEXED.fullmatch(p):
            return ".".join(parts[: i + 1]) if i else parts[0]
    return parts[0]


def node_blocks(graph) -> dict[str, str]:
    """Block of every (named) node. A node outside any block that holds a weight (the global pool
    between the features and the classifier, a flatten) joins the block before it, so a block kept
    fp32 leaves no int8 island behind it."""
    weighted = {block_of(module_path(n)) for n in graph.node if n.op_type in WEIGHTED and module_path(n)}
    out, last = {}, ""
    for n in graph.node:
        path = module_path(n)
        b = block_of(path) if path else ""
        if b in weighted:
            last = b
        out[n.name] = b if b in weighted else last
    first = next((b for b in out.values() if b), "")
    return {k: v or first for k, v in out.items()}  # nodes before the first weight join the first block


def blocks(graph) -> list[str]:
    """Blocks that hold at least one weighted node, in graph order."""
    return list(dict.fromkeys(b for b in node_blocks(graph).values() if b))


@dataclass
class Plan:
    """Blocks and single nodes kept fp32, each with the reason; everything else is int8."""

    name: str
    fp32_blocks: dict[str, str] = field(default_factory=dict)  # block -> why
    fp32_modules: dict[str, str] = field(default_factory=dict)  # module path -> why (the stem)
    fp32_patterns: list[str] = field(default_factory=list)  # the user's keep_fp32 entries, matched per graph

    def with_block(self, block: str, why: str, name: str) -> "Plan":
        return Plan(name, {**self.fp32_blocks, block: why}, dict(self.fp32_modules), list(self.fp32_patterns))

    def keeps_module(self, path: str) -> bool:
        """Whether a module (a conv or linear of the PyTorch model) stays fp32: QAT does not wrap it."""
        return (path in self.fp32_modules or block_of(path) in self.fp32_blocks
                or any(_matches(p, path, None) for p in self.fp32_patterns))

    def excluded_nodes(self, graph) -> dict[str, str]:
        """ONNX node name -> why it stays fp32, for onnxruntime's `nodes_to_exclude`."""
        out: dict[str, str] = {}
        nb = node_blocks(graph)
        for n in graph.node:
            path = module_path(n)
            if path and path in self.fp32_modules:
                out[n.name] = self.fp32_modules[path]
            elif nb[n.name] in self.fp32_blocks:
                out[n.name] = self.fp32_blocks[nb[n.name]]
            else:
                hit = next((p for p in self.fp32_patterns if not _is_op_type(p) and _matches(p, path, n)), None)
                if hit is not None:
                    out[n.name] = f"quantize.keep_fp32: {hit!r}"
        return out

    def op_types_kept_fp32(self) -> list[str]:
        """The user's patterns that name op types: left out of the quantizer's op types (their
        nodes may have no name, e.g. those inlined from a function, so nodes_to_exclude cannot
        name them)."""
        return [p for p in self.fp32_patterns if _is_op_type(p)]

    def to_json(self) -> dict:
        return {"name": self.name, "fp32_blocks": self.fp32_blocks, "fp32_modules": self.fp32_modules,
                "keep_fp32": self.fp32_patterns}

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        return cls(d["name"], dict(d.get("fp32_blocks", {})), dict(d.get("fp32_modules", {})), list(d.get("keep_fp32", [])))


def _is_op_type(pattern: str) -> bool:
    return re.fullmatch(r"[A-Z][A-Za-z]*", pattern) is not None


def _matches(pattern: str, path: str, node) -> bool:
    """An op type (`HardSigmoid`), or an fnmatch pattern on the module path (`features.1*`) or on
    the ONNX node name (`/classifier/*`)."""
    if _is_op_type(pattern):
        return node is not None and node.op_type == pattern
    return fnmatch.fnmatchcase(path, pattern) or (node is not None and fnmatch.fnmatchcase(node.name, pattern))


def rule_plan(graph, keep_first_conv_fp32: bool, keep_fp32: list[str]) -> Plan:
    """The fixed rules every plan starts from: the stem and the user's patterns."""
    plan = Plan("int8", fp32_patterns=list(keep_fp32))
    if keep_first_conv_fp32:
        stem = next((n for n in graph.node if n.op_type == "Conv"), None)
        if stem is not None:
            plan.fp32_modules[module_path(stem) or stem.name] = STEM_REASON
    return plan


def unmatched_patterns(plan: Plan, graph) -> list[tuple[int, str]]:
    """(index, pattern) of the user's keep_fp32 entries that match no node of the graph: a typo would
    otherwise quantize what the user meant to keep."""
    out = []
    for i, p in enumerate(plan.fp32_patterns):
        if not any(_matches(p, module_path(n), n) for n in graph.node):
            out.append((i, p))
    return out


def load_graph(path: Path):
    import onnx

    return onnx.load(str(path)).graph


def profiles(path: Path, x, runs: int = 200, threads: int = 1) -> tuple[dict[str, dict], dict[str, dict]]:
    """Nodes and microseconds per inference after onnxruntime's fusions (its profiler), from one
    profiled session: per op type, so a plan can say which ops stay float and what they cost
    (float_cost), and per kind of op (op_kind), which sets an fp32 file's time against its int8
    file's, op for op, whatever kernels onnxruntime ran each on (kind_comparison)."""
    import json
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    warmup = 10
    with tempfile.TemporaryDirectory() as td:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.enable_profiling, so.profile_file_prefix = True, os.path.join(td, "p")
        so.optimized_model_filepath = os.path.join(td, "optimized.onnx")  # the nodes the profiler names
        so.log_severity_level = 3  # not the warning that this file is for this machine only: it is read here
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(warmup + runs):
            sess.run(None, {name: x})
        with open(sess.end_profiling()) as f:
            events = json.load(f)
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    kinds = {n.name: op_kind(n, graph) for n in graph.node}
    timed = [(e["name"][: -len("_kernel_time")], e["args"]["op_name"], e["dur"] / (warmup + runs)) for e in events
             if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    return (kind_table((op, node, us) for node, op, us in timed),
            kind_table((kinds.get(node) or type_kind(op), node, us) for node, op, us in timed))


def kind_table(samples) -> dict[str, dict]:
    """(kind, node, microseconds per inference) samples -> {kind: {"nodes", "us"}}, slowest first:
    the table every runtime's per-operator profile gives (profiles, bench.runtimes.Runtime.
    op_profile), a node counted once however many samples it has."""
    table: dict[str, list] = {}
    for kind, node, us in samples:
        entry = table.setdefault(kind, [0.0, set()])
        entry[0] += us
        entry[1].add(node)
    return {k: {"nodes": len(nodes), "us": round(us, 1)} for k, (us, nodes) in sorted(table.items(), key=lambda kv: -kv[1][0])}


CONVS = ("Conv", "QLinearConv", "ConvInteger", "FusedConv")
DENSE = ("Gemm", "QGemm", "FusedGemm", "MatMul", "QLinearMatMul", "MatMulInteger")
POOLS = ("GlobalAveragePool", "QLinearGlobalAveragePool", "AveragePool", "QLinearAveragePool", "MaxPool")


def op_kind(node, graph) -> str:
    """What a node computes, the same name for the fp32 op and its int8 kernel (Conv, onnxruntime's
    NCHWc Conv and QLinearConv are all convolutions): "1x1 conv", "depthwise conv" (grouped),
    "conv" (larger kernels), else type_kind of its op type."""
    if node.op_type in CONVS:
        attrs = {a.name: a for a in node.attribute}
        if "group" in attrs and attrs["group"].i > 1:
            return "depthwise conv"
        kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else _weight_kernel(node, graph)
        return "1x1 conv" if kernel and all(k == 1 for k in kernel) else "conv"
    return type_kind(node.op_type)


def type_kind(t: str) -> str:
    """What an op type computes: "dense", "add", "multiply", "pool", "quantize / dequantize",
    "layout change", "conv", else the op type in lower case, with onnxruntime's int8 prefix
    dropped (QLinearMul and Mul alike), as XNNPACK's and OpenVINO's ops are named
    (bench.runtimes)."""
    if t in CONVS:
        return "conv"
    if t in DENSE:
        return "dense"
    if t in ("Add", "QLinearAdd", "Sum"):
        return "add"
    if t in ("Mul", "QLinearMul"):  # MobileNetV3's squeeze-excitation scales
        return "multiply"
    if t in ("QuantizeLinear", "DequantizeLinear"):
        return "quantize / dequantize"
    if t in POOLS:
        return "pool"
    if t in ("Transpose", "ReorderInput", "ReorderOutput"):  # onnxruntime's NCHWc layout and back
        return "layout change"
    return (t[len("QLinear"):] if t.startswith("QLinear") else t).lower()


def _weight_kernel(node, graph) -> list[int]:
    """A convolution's kernel from its weight's shape, where the node does not state it."""
    weight = node.input[3 if node.op_type == "QLinearConv" else 1]
    init = next((i for i in graph.initializer if i.name == weight), None)
    return list(init.dims[2:]) if init is not None else []


def kind_comparison(fp32: dict[str, dict], int8: dict[str, dict]) -> list[dict]:
    """profiles() by kind of an fp32 file and of its int8 file, row by row, slowest first: where int8
    gains time and where it loses it on this CPU's kernels (an fp32 add is fused into its
    convolution, so it has no time of its own; no speed-up where either time is below the
    profiler's resolution)."""
    rows = []
    for kind in sorted(set(fp32) | set(int8), key=lambda k: -max(fp32.get(k, {}).get("us", 0), int8.get(k, {}).get("us", 0))):
        a, b = fp32.get(kind), int8.get(kind)
        rows.append({"ops": kind, "fp32_nodes": a["nodes"] if a else 0, "fp32_us": a["us"] if a else None,
                     "int8_nodes": b["nodes"] if b else 0, "int8_us": b["us"] if b else None,
                     "int8_speedup": round(a["us"] / b["us"], 2) if a and b and min(a["us"], b["us"]) > 0 else None})
    return rows


LOSS_WORTH_NAMING = 0.01  # of the fp32 file's time: a smaller difference is the profiler's noise
LOSSES_NAMED = 3  # the costliest kinds; the rest are counted (the by-op table beside has every row)


def int8_losses(by_op: list[dict]) -> str:
    """Where the int8 file spends more time than the fp32 file (kind_comparison), in one line that
    a headline can carry: the op kinds its int8 kernels run slower, and those only the int8 file
    has (an fp32 add is fused into its convolution; quantize / dequantize at float islands and
    the file's ends), each where it costs at least LOSS_WORTH_NAMING of the fp32 file's time,
    the LOSSES_NAMED costliest named first and the others counted."""
    floor = max(LOSS_WORTH_NAMING * sum(r["fp32_us"] or 0 for r in by_op), 1e-9)
    lost = lambda r: (r["int8_us"] or 0) - (r["fp32_us"] or 0)  # noqa: E731
    costly = [r for r in sorted(by_op, key=lost, reverse=True) if lost(r) >= floor]
    named = [f"{r['ops']} +{lost(r):.0f} us (no such kernel in the fp32 file)" if r["fp32_us"] is None else
             f"{r['ops']} {r['int8_speedup']}x ({r['int8_us']:g} vs {r['fp32_us']:g} us)" if r["int8_speedup"] else
             f"{r['ops']} +{lost(r):.0f} us" for r in costly[:LOSSES_NAMED]]
    rest = f" and {len(costly) - LOSSES_NAMED} more kinds" if len(costly) > LOSSES_NAMED else ""
    return ", ".join(named) + rest or "nothing"


# the ops left in an onnxruntime int8 file that are not int8 kernels: the price of a float island
QDQ_OVERHEAD = ("QuantizeLinear", "DequantizeLinear")
INT8_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
                "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear")


def float_cost(profile: dict[str, dict]) -> dict:
    """Split an int8 file's time into int8 kernels, Q/DQ conversions and float ops."""
    total = sum(v["us"] for v in profile.values()) or 1.0
    q = sum(v["us"] for k, v in profile.items() if k in QDQ_OVERHEAD)
    i8 = sum(v["us"] for k, v in profile.items() if k in INT8_KERNELS)
    fl = {k: v for k, v in profile.items() if k not in QDQ_OVERHEAD and k not in INT8_KERNELS}
    return {"int8_kernels_pct": round(100 * i8 / total, 1), "quantize_dequantize_pct": round(100 * q / total, 1),
            "float_ops_pct": round(100 * sum(v["us"] for v in fl.values()) / total, 1),
            "float_ops": {k: v["nodes"] for k, v in fl.items()}}


def search(fp32: Path, workdir: Path, calib, base: Plan, quantize, threads: int = 1, margin: float = MARGIN,
           budget_ms: float = 2500.0, progress: bool = True, runtime: str = "onnxruntime") -> list[dict]:
    """Greedy per-block search on `runtime` (one that runs ONNX files): from `base` (every block
    int8) keep a block fp32 when that makes the file at least `margin` faster; and where the
    result is still not faster than fp32 (MobileNetV3's hardswish islands), from every block fp32
    make a block int8 when that does.
    Each step times the candidate against the current best interleaved in the same rounds, so load
    from another process lands on both.
    `quantize(plan, path)` writes a file for a plan (calibrated on a few images: ranges change
    accuracy, not speed). Returns the plans kept on the way, each with its p50 and its speed-up
    over fp32 measured together at the end."""
    from tqdm import tqdm

    from ..bench.measure import round_ratio, runs_within, time_interleaved
    from ..bench.runtimes import RUNTIMES

    rt = RUNTIMES.get(runtime)()
    x = calib[:1]
    workdir.mkdir(parents=True, exist_ok=True)
    graph = load_graph(fp32)
    fp32_run = rt.load(fp32, threads)
    runs = runs_within(fp32_run, x, budget_ms / 2)  # per candidate pair: ~budget_ms of timing
    todo = [b for b in blocks(graph) if b not in base.fp32_blocks]
    files = iter(workdir / f"plan_{i}.onnx" for i in range(10**6))
    bar = tqdm(desc="quantize plan", unit="try", disable=not progress, leave=False)

    def walk(start: Plan, to_fp32: bool) -> list[tuple[Plan, Path]]:
        kept = [(start, quantize(start, next(files)))]
        for block in todo:
            bar.update()
            cur, cur_file = kept[-1]
            k = len(kept)
            if to_fp32:
                cand = cur.with_block(block, "", f"int8 -{k} block{'s' * (k > 1)}")  # the reason once measured
            else:
                cand = Plan(f"fp32 +{k} int8 block{'s' * (k > 1)}", {b: v for b, v in cur.fp32_blocks.items() if b != block},
                            dict(cur.fp32_modules), list(cur.fp32_patterns))
            if cand.excluded_nodes(graph).keys() == cur.excluded_nodes(graph).keys():
                continue  # the rules already decide this block
            f = quantize(cand, next(files))
            t = time_interleaved({"cur": rt.load(cur_file, threads), "cand": rt.load(f, threads)}, x, 10, runs, 10)
            gain = round_ratio(t["cur"], t["cand"])
            if gain >= 1 + margin:
                if to_fp32:
                    cand.fp32_blocks[block] = f"{gain:.2f}x faster on {runtime} with it fp32"
                kept.append((cand, f))
            else:
                f.unlink()
        return kept

    kept = walk(base, True)
    best = time_interleaved({"fp32": fp32_run, "best": rt.load(kept[-1][1], threads)}, x, 10, runs, 10)
    if round_ratio(best["fp32"], best["best"]) < 1 + margin:
        # int8 does not pay block by block from the top: build up from fp32 instead
        all_fp32 = Plan("fp32", {b: f"int8 did not pay on {runtime}" for b in todo}, dict(base.fp32_modules),
                        list(base.fp32_patterns))
        kept += walk(all_fp32, False)
    bar.close()
    return time_plans(fp32, kept, x, runs, threads, runtime)


def time_plans(fp32: Path, kept: list[tuple[Plan, Path]], x, runs: int, threads: int = 1,
               runtime: str = "onnxruntime") -> list[dict]:
    """Every plan's file timed against fp32 in the same interleaved rounds: p50 and speed-up."""
    from ..bench.measure import round_ratio, time_interleaved
    from ..bench.runtimes import RUNTIMES

    rt = RUNTIMES.get(runtime)()
    timed = time_interleaved({"fp32": rt.load(fp32, threads), **{str(i): rt.load(f, threads) for i, (_, f) in enumerate(kept)}},
                             x, 10, runs, 10)
    return [{"plan": plan, "file": f, "p50_ms": timed[str(i)]["p50_ms"], "fp32_p50_ms": timed["fp32"]["p50_ms"],
             "speedup_vs_fp32": round_ratio(timed["fp32"], timed[str(i)])} for i, (plan, f) in enumerate(kept)]


def recover_accuracy(start: Plan, graph, evaluate, fp32_top1: float, max_drop: float, limit: int = 3) -> list[dict]:
    """Where no timed plan holds the accuracy budget: the blocks whose int8 costs the most accuracy,
    kept fp32 one after another (at most `limit`) until the budget holds. Each block's cost is
    measured once alone (its top-1 with only it fp32), like NNCF's accuracy-aware ranking;
    `evaluate(plan)` -> (top-1, file). Returns the plans tried, each with its top-1."""
    alone = {}
    start_nodes = start.excluded_nodes(graph).keys()
    for b in blocks(graph):
        cand = start.with_block(b, "", f"{start.name} +fp32 {b}")
        if b in start.fp32_blocks or cand.excluded_nodes(graph).keys() == start_nodes:
            continue
        alone[b] = evaluate(cand)
    order = sorted(alone, key=lambda b: -alone[b][0])
    out, plan = [], start
    for k, b in enumerate(order[:limit]):
        plan = plan.with_block(b, f"kept fp32 for accuracy (alone: {alone[b][0]:.2f} % top-1)",
                               f"{start.name} -{k + 1} for accuracy")
        top1, f = alone[b] if k == 0 else evaluate(plan)
        out.append({"plan": plan, "file": f, "top1": top1, "drop_points": round(fp32_top1 - top1, 3)})
        if fp32_top1 - top1 <= max_drop:
            break
    return out


def choose(candidates: list[dict], evaluate, fp32_top1: float, max_drop: float) -> dict:
    """The fastest candidate whose top-1 is within `max_drop` points of fp32; `evaluate(plan)`
    quantizes it with the full calibration set and returns (top-1, file). Candidates are tried
    fastest first and evaluation stops at the first that holds (one evaluated already keeps its
    top-1); if none does, the most accurate one is kept (`within_budget` False says so).
    Fastest is the highest speed-up over fp32 (time_plans: the median of per-round ratios, all
    candidates timed in the same rounds), as the report shows; their p50s, each a median of
    round medians, can order two candidates the other way on a VM whose speed changes between
    rounds, and did: a plan at 0.87x the fp32 speed was kept over the all-fp32 one at 0.99x."""
    tried = []
    for c in sorted(candidates, key=lambda c: (-c.get("speedup_vs_fp32", 0.0), c["p50_ms"])):
        if c.get("top1") is None:
            c["top1"], c["final_file"] = evaluate(c["plan"])
        c.setdefault("final_file", c.get("file"))
        c["drop_points"] = round(fp32_top1 - c["top1"], 3)
        tried.append(c)
        if c["drop_points"] <= max_drop:
            return {**c, "within_budget": True}
    return {**max(tried, key=lambda c: c["top1"]), "within_budget": False}


def fastest_int8(candidates: list[dict]) -> dict | None:
    """The fastest timed candidate with any int8 in it (the all-fp32 plan is named `fp32`)."""
    int8 = [c for c in candidates if c["plan"] != "fp32"]
    return max(int8, key=lambda c: c["speedup_vs_fp32"]) if int8 else None
