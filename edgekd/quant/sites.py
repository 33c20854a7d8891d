"""Where the int8 file rounds activations, found in the PyTorch model, so QAT rounds the same tensors.

onnxruntime's QDQ quantizer rounds every tensor that enters or leaves an int8 op, once: a
conv's input, but also a residual branch's output and the shortcut before their Add, the
Add's output, a pool's input and output, the logits. Fake quantization on conv inputs alone
leaves the rest out of training, and gives the bias no input grid to follow (quant.qat keeps
the int32 bias on the grid of the site that feeds its layer), so the file computes something
else than the model that was trained and verified.

So the tensors come from the file itself, not from rules about ops: quantize the BN-folded
model once with the plan (a few calibration images), read which tensors its QuantizeLinear
nodes take, and find each in PyTorch by value: run the fp32 graph with those tensors as
outputs and the model with hooks recording what every module returns (and takes), and match.
A tensor is rounded where it is made (a module's output, so every consumer, the shortcut
included, sees the rounded value) or, where no module makes it (a functional pool, a
flatten), where a module takes it. A tensor made inside a module's forward (an activation the
exporter decomposes, a channel shuffle) has neither and is left out (`find_sites` names them).
The names and module paths are a `Site` list recorded in the QAT transform, so a checkpoint
rebuilds the same simulation, and the file is quantized on the ranges the sites learned
(onnxruntime's TensorQuantOverrides by tensor name)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

OUTPUT_SUFFIX = "_QuantizeLinear_Input"  # onnxruntime renames a graph output it quantizes


@dataclass(frozen=True)
class Site:
    path: str  # module path ('' for the model itself)
    call: int  # which call of that module in one forward (a shared ReLU runs several times)
    kind: str  # "out": the module's output; "in": its first input
    tensors: tuple[str, ...]  # the ONNX tensors it is (a Flatten's input and output are one site)
    feeds: tuple[str, ...] = ()  # the int8 convs / linears that take it: their int32 bias is on its grid

    def to_json(self) -> list:
        return [self.path, self.call, self.kind, list(self.tensors), list(self.feeds)]

    @classmethod
    def from_json(cls, v: list) -> "Site":
        return cls(str(v[0]), int(v[1]), str(v[2]), tuple(v[3]), tuple(v[4]) if len(v) > 4 else ())


def quantized_tensors(qfile: Path) -> list[str]:
    """The activations a QDQ file rounds: the float tensors its QuantizeLinear nodes take,
    named as in the graph it was quantized from."""
    import onnx

    g = onnx.load(str(qfile), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    names = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            t = n.input[0]
            if t.endswith(OUTPUT_SUFFIX) and t[: -len(OUTPUT_SUFFIX)] in outputs:
                t = t[: -len(OUTPUT_SUFFIX)]
            if t not in names:
                names.append(t)
    return names


def _onnx_values(fp32: Path, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The fp32 graph's values of `names` on `x` (graph optimizations off: every tensor kept)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(fp32))
    have = {o.name for o in m.graph.output}
    produced = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
    wanted = [t for t in names if t in produced]
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {s.get_inputs()[0].name: x}
    outs = [o.name for o in s.get_outputs()]
    vals = dict(zip(outs, s.run(outs, feeds)))
    vals.update({i.name: x for i in m.graph.input if i.name in names})
    return {t: vals[t] for t in wanted if t in vals}


def _torch_records(model: nn.Module, x: torch.Tensor, numels: set[int]):
    """Every module's outputs and first inputs on `x`, in the order they are made: (path, call,
    kind, value); only values whose size some wanted tensor has. Copies: an in-place activation
    would change a recorded conv output into its own."""
    records: list[tuple[str, int, str, np.ndarray]] = []
    calls: dict[str, int] = {}  # forward hooks count a module's calls, pre-hooks read the count
    handles = []

    def pre(path):
        def f(_m, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].numel() in numels:
                records.append((path, calls.get(path, 0), "in", args[0].detach().float().numpy().copy()))
        return f

    def post(path):
        def f(_m, _args, out):
            call = calls.get(path, 0)
            calls[path] = call + 1
            if isinstance(out, torch.Tensor) and out.numel() in numels:
                records.append((path, call, "out", out.detach().float().numpy().copy()))
        return f

    for path, m in model.named_modules():
        handles += [m.register_forward_pre_hook(pre(path)), m.register_forward_hook(post(path))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return records


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size == b.size and bool(np.allclose(a.reshape(-1), b.reshape(-1), rtol=1e-3,
                                                 atol=1e-4 * float(np.abs(b).max()) + 1e-5))


def match_sites(model: nn.Module, fp32: Path, names: list[str], x: np.ndarray) -> tuple[list[Site], list[str]]:
    """Each tensor of `names` (in the fp32 ONNX export of `model`) as a Site: the first module
    output it equals, else the first module input (the outermost module that takes it). Returns
    the sites and the tensors found nowhere."""
    values = _onnx_values(fp32, names, x)
    records = _torch_records(model, torch.from_numpy(x), {v.size for v in values.values()})
    outs = [r for r in records if r[2] == "out"]
    ins = [r for r in records if r[2] == "in"]
    by_key: dict[tuple[str, int, str], list[str]] = {}
    missing = []
    for t in names:
        v = values.get(t)
        # a constant tensor (a dead ReLU's zeros) equals too many others to be placed by value
        hit = None if v is None or np.ptp(v) == 0 else next((r for r in [*outs, *ins] if _same(r[3], v)), None)
        if hit is None:
            missing.append(t)
        else:
            by_key.setdefault(hit[:3], []).append(t)
    feeds = _layer_inputs(fp32)
    return [Site(p, c, k, tuple(ts), tuple(sorted(layer for t in ts for layer in feeds.get(t, []))))
            for (p, c, k), ts in by_key.items()], missing


def _layer_inputs(fp32: Path) -> dict[str, list[str]]:
    """Tensor -> the module paths of the Conv / Gemm nodes that take it (by their weight's
    name, `<module path>.weight`, as the TorchScript exporter names parameters)."""
    import onnx

    feeds: dict[str, list[str]] = {}
    for n in onnx.load(str(fp32), load_external_data=False).graph.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1].endswith(".weight"):
            feeds.setdefault(n.input[0], []).append(n.input[1][: -len(".weight")])
    return feeds


def find_sites(folded: nn.Module, image_size: int, calib: np.ndarray, plan, qopts: dict) -> tuple[list[Site], list[str]]:
    """The sites of the file that QAT of this BN-folded model will become: export it, quantize it
    with the plan on a few calibration images, and match what that file rounds (match_sites)."""
    import copy

    from ..onnx_export import export_onnx
    from .ptq import quantize_onnx

    with tempfile.TemporaryDirectory() as td:
        fp32 = export_onnx(copy.deepcopy(folded), Path(td) / "folded.onnx", image_size)
        qfile = quantize_onnx(fp32, Path(td) / "probe.onnx", calib[:32], plan=plan, **qopts)
        names = quantized_tensors(qfile)
        if not names:
            return [], []
        return match_sites(folded, fp32, names, np.ascontiguousarray(calib[:4], dtype=np.float32))


class _Round:
    """A forward (pre-)hook that rounds one call's output (input) through a site's fake quant.
    A callable object, not a closure: deepcopy of the model copies it with the model, so the
    copy's hook rounds through the copy's quantizer."""

    def __init__(self, fq: nn.Module, call: int):
        self.fq, self.call, self.seen = fq, call, 0

    def _now(self) -> bool:
        i, self.seen = self.seen, self.seen + 1
        return i == self.call

    def __call__(self, _module, args, out=None):
        if out is None:  # pre-hook
            return (self.fq(args[0]), *args[1:]) if self._now() else None
        return self.fq(out) if self._now() else None


class _NewForward:
    """The model's forward pre-hook: a new forward starts every site's call count again."""

    def __init__(self, rounds: list[_Round]):
        self.rounds = rounds

    def __call__(self, _module, _args):
        for r in self.rounds:
            r.seen = 0


SITES_ATTR = "edgekd_sites"  # the model's ModuleList of the sites' quantizers (in its state_dict)


def install(model: nn.Module, sites: list[Site], make_fq) -> nn.ModuleList:
    """Round each site's tensor through a fresh quantizer (`make_fq()`), kept on the model;
    returns the quantizers, one per site."""
    modules = dict(model.named_modules())
    fqs = nn.ModuleList([make_fq() for _ in sites])
    rounds = []
    for s, fq in zip(sites, fqs):
        if s.path not in modules:
            raise ValueError(f"quantization site {s.path!r}: no such module")
        r = _Round(fq, s.call)
        rounds.append(r)
        m = modules[s.path]
        m.register_forward_hook(r) if s.kind == "out" else m.register_forward_pre_hook(r)
    model.register_forward_pre_hook(_NewForward(rounds), prepend=True)  # before a site on the model's own input
    fqs.sites = list(sites)  # what each quantizer rounds (site_ranges); not state, so outside the state_dict
    setattr(model, SITES_ATTR, fqs)
    return fqs


def uninstall(model: nn.Module) -> nn.Module:
    """Remove the sites' hooks and quantizers (the float model for export)."""
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for k in [k for k, h in hooks.items() if isinstance(h, (_Round, _NewForward))]:
                del hooks[k]
    if hasattr(model, SITES_ATTR):
        delattr(model, SITES_ATTR)
    return model


def site_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Each site tensor's learned range, by ONNX tensor name (for quant.ptq.quantize_onnx)."""
    fqs = getattr(model, SITES_ATTR, None)
    if fqs is None:
        return {}
    out = {}
    for s, fq in zip(fqs.sites, fqs):
        if bool(fq.initialized):
            for t in s.tensors:
                out[t] = (float(fq.lo), float(fq.hi))
    return out
