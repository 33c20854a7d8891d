"""Forward passes as fast as this device runs them: the pipeline's evaluation, teacher-logit
tables and BatchNorm statistics, and the training loop's layout.

Two things decide the speed of a convolutional network on a CPU, both measured in
benchmarks/README.md ("CPU speed", benchmarks/cpu_layout.py):

- the memory layout: PyTorch's CPU convolutions run channels_last (NHWC) tensors well and the
  default NCHW ones poorly, for training steps as for inference. `channels_last` switches a
  model for the length of a block and back after it, so checkpoints, pruning and the exporters
  only ever see the default layout. A GPU's bf16 tensor-core convolutions run NHWC as well
  (benchmarks/README.md, "GPU");
- onnxruntime for a frozen model over many images (a teacher's test figures and logit table, its
  live forward under random crops): several times faster than PyTorch on a CPU. The model is
  exported once, in memory, and kept only where onnxruntime's logits match PyTorch's on a
  probe batch; otherwise (an op the exporter does not know, no onnxruntime) PyTorch runs it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
import weakref
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger("edgekd")
ORT_MATCH = 1e-3  # onnxruntime's logits must be this close to PyTorch's (relative to their scale) to be used

_switched: weakref.WeakSet = weakref.WeakSet()  # models inside a `channels_last` block (blocks nest)
_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # frozen model -> its onnxruntime runner (or None)


def layout_pays(device: torch.device) -> bool:
    """Whether channels_last is used on `device` (see the module docstring)."""
    return device.type in ("cpu", "cuda")


@contextmanager
def channels_last(device: torch.device, *models: nn.Module | None):
    """Run the block with `models`' 4-D weights in channels_last where that pays on `device`,
    and put them back in the default layout after it. Inputs follow the weights by themselves
    (a convolution with channels_last weights returns channels_last outputs)."""
    mine = [m for m in models if m is not None and layout_pays(device) and m not in _switched
            and any(p.dim() == 4 for p in m.parameters())]
    for m in mine:
        m.to(memory_format=torch.channels_last)
        _switched.add(m)
    try:
        yield
    finally:
        for m in mine:
            m.to(memory_format=torch.contiguous_format)
            _switched.discard(m)


def frozen_forward(model: nn.Module, device: torch.device, probe: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model`'s float logits for a normalised batch, for a model whose weights no longer change
    (a teacher): onnxruntime on a CPU where it matches PyTorch on `probe`, else PyTorch in the
    layout that pays. Made once per model and kept while the model lives."""
    if device.type != "cpu" or hasattr(model, "session"):  # an ONNX teacher runs in onnxruntime already
        return _torch_forward(model, device)
    if model not in _runners:
        _runners[model] = _ort_forward(model, probe)
    return _runners[model] or _torch_forward(model, device)


def _torch_forward(model: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        with channels_last(device, model):
            return model(x).float()

    return run


def _ort_forward(model: nn.Module, probe: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    model.eval()
    buf = io.BytesIO()

    shrink = ort.RunOptions()  # hand the batch's activations back after each run (same speed; GBs at 224 px)
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {"x": np.ascontiguousarray(x.float().numpy())}, shrink)[0])

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, probe[:1], buf, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = torch.get_num_threads(), 1
        sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        got = run(probe)
    except Exception as e:  # the exporter or onnxruntime does not know an op: PyTorch runs it
        log.info("%s runs in PyTorch: onnxruntime cannot take it (%s)", type(model).__name__, str(e).splitlines()[0][:120])
        return None
    with torch.no_grad():
        want = model(probe).float()
    diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    if not diff <= ORT_MATCH * max(1.0, float(want.abs().max())):
        log.info("%s runs in PyTorch: onnxruntime's logits differ by %.3g on a probe batch", type(model).__name__, diff)
        return None
    return run


_LAST: dict[str, np.ndarray] = {}  # predict's last logits of a model in training, by evaluation_key


def evaluation_key(model: nn.Module, data, split, device: torch.device) -> str | None:
    """What a model's logits on a split depend on: its weights and buffers (with their shapes and
    dtypes), the split's images, the normalisation, the batch size and the device. None where
    the state holds anything but plain tensors (packed or quantized weights): no key, no reuse."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((type(model).__name__, split.key, len(split), split.size, data.mean, data.std,
                   data.eval_batch_size, str(device))).encode())
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or t.is_quantized or t.layout != torch.strided:
            return None
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def kept_logits() -> dict[str, np.ndarray]:
    """predict's kept logits, to hand to another process that holds the same weights (beside.py)."""
    return dict(_LAST)


def keep_logits(kept: dict[str, np.ndarray]) -> None:
    """Take logits kept_logits gave: predict returns them for the same weights, split and device."""
    if kept:
        _LAST.clear()
        _LAST.update(kept)


@torch.no_grad()
def predict(model: nn.Module, data, split, device: torch.device, frozen: bool = False, together: bool = False,
            what: str = "evaluating") -> np.ndarray:
    """Logits of `model` on a Split, in order (no augmentation); `frozen`: the model's weights
    no longer change (a teacher), so onnxruntime may run it (`frozen_forward`). `together`:
    every rank of a torchrun group makes this call with the same model; each computes every
    ranks-th image of each batch and every rank gets all the logits (`what` the group is doing,
    for the error if a rank is lost). A progress bar appears when this takes over 3 s.

    A training run's last evaluation and its stage's measurement of the same weights are one
    pass: the last logits of a model that is not frozen are kept by evaluation_key and
    returned again while the weights stay as they were. Only a call outside a group reads
    them, so every rank of a group always makes the same collective calls."""
    from tqdm import tqdm

    from . import dist
    from .data import iterate

    key = None if frozen else evaluation_key(model, data, split, device)
    if key in _LAST and not together:
        return _LAST[key].copy()
    model.eval()
    share = dist.share(together)
    out, forward = None, None
    with tqdm(total=len(split), desc=f"evaluate {type(model).__name__}", unit="img", leave=False, delay=3,
              disable=not dist.world().main) as bar, \
            channels_last(device, model):  # once here, not per batch where a frozen model stays in PyTorch
        for x, _, idx, _ in iterate(split, data.eval_batch_size, shard=share):
            if not len(idx):  # a last batch smaller than the group
                continue
            x = data.normalize(x.to(device))
            if forward is None:
                forward = frozen_forward(model, device, x[:8]) if frozen else (lambda t: model(t).float())
            y = forward(x).cpu()
            if out is None:
                out = torch.zeros(len(split), y.shape[1])
            out[idx] = y
            bar.update(len(idx) * share[1])
    if out is None:  # a rank with no image (a split smaller than the group) adds nothing
        out = torch.zeros(len(split), data.num_classes)
    if share[1] > 1:
        out = dist.all_sum(out.to(device), what).cpu()
    if key is not None:
        _LAST.clear()
        _LAST[key] = out.numpy().copy()
    return out.numpy()
