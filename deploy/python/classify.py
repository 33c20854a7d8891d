#!/usr/bin/env python3
"""Classify images with an ONNX or LiteRT (.tflite) model exported by edgekd.

Needs only numpy, Pillow and the model's runtime: onnxruntime for .onnx/.ort, ai-edge-litert
for .tflite (no torch, no edgekd), so it runs on a Raspberry Pi or any other board that has
a Python and one of those wheels.

    python classify.py model.onnx|model.tflite image.jpg [image2.png ...] [--top-k 5] [--threads N] [--json]

Preprocessing and class names come from the model's metadata, written by edgekd's exporter
(ONNX metadata_props; in a .tflite, the flatbuffer's metadata table, one entry per key):

    edgekd.classes     JSON list of class names
    edgekd.input_size  JSON [C, H, W]
    edgekd.mean        JSON list of 3 floats (applied after scaling RGB to [0, 1])
    edgekd.std         JSON list of 3 floats
    edgekd.layout      "NCHW"
    edgekd.resize      "short_side_centre_crop": short side resized (bilinear) to
                       edgekd.resize_short (default H), centre crop, then the centre
                       H x W (how edgekd trained and evaluated the model); or "resize"
                       (older files: whole image to H x W, bilinear)
    edgekd.temperature softmax temperature fit on held-out images (optional, default 1):
                       probabilities are softmax(logits / T), so a threshold on them
                       means what it says

Works the same for fp32 and int8 models: the input is float32, except for a .tflite
exported with integer I/O, whose int8 input is quantized here with the scale and zero
point of its input tensor (also in edgekd.input_quantization).
Exit status: 0 ok, 1 runtime/model/image error, 2 usage error.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

PROG = "classify"
META_PREFIX = "edgekd."
REQUIRED_KEYS = ("classes", "input_size", "mean", "std")
SUPPORTED_LAYOUTS = ("NCHW",)
SUPPORTED_RESIZE = ("short_side_centre_crop", "resize")


class ClassifyError(Exception):
    """An error reported as one 'classify: error: ...' line."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (no usage dump)
        raise ClassifyError(message, code=2)


# --------------------------------------------------------------------------- metadata


def _json_field(meta: dict, key: str):
    raw = meta.get(META_PREFIX + key)
    if raw is None:
        raise ClassifyError(f"model metadata lacks '{META_PREFIX}{key}' (was it exported by edgekd?)")
    try:
        return json.loads(raw)
    except ValueError:
        raise ClassifyError(f"model metadata '{META_PREFIX}{key}' is not valid JSON: {raw!r}") from None


def parse_metadata(meta: dict) -> dict:
    """Validate the edgekd.* metadata and return a preprocessing spec."""
    if not any(k.startswith(META_PREFIX) for k in meta):
        raise ClassifyError("model has no edgekd metadata (edgekd.classes, edgekd.input_size, ...); "
                            "export it with edgekd")
    classes = _json_field(meta, "classes")
    size = _json_field(meta, "input_size")
    mean = _json_field(meta, "mean")
    std = _json_field(meta, "std")
    layout = meta.get(META_PREFIX + "layout", "NCHW")
    resize = meta.get(META_PREFIX + "resize", "resize")

    if not isinstance(classes, list) or not classes:
        raise ClassifyError("model metadata 'edgekd.classes' must be a non-empty JSON list")
    if (not isinstance(size, list) or len(size) != 3
            or not all(isinstance(v, int) and v > 0 for v in size)):
        raise ClassifyError(f"model metadata 'edgekd.input_size' must be [C, H, W], got {size!r}")
    if size[0] != 3:
        raise ClassifyError(f"only 3-channel (RGB) models are supported, input_size is {size!r}")
    for name, vals in (("mean", mean), ("std", std)):
        if (not isinstance(vals, list) or len(vals) != 3
                or not all(isinstance(v, (int, float)) for v in vals)):
            raise ClassifyError(f"model metadata 'edgekd.{name}' must be a list of 3 numbers, got {vals!r}")
    if any(v == 0 for v in std):
        raise ClassifyError("model metadata 'edgekd.std' contains 0")
    if layout not in SUPPORTED_LAYOUTS:
        raise ClassifyError(f"unsupported layout {layout!r} (supported: {', '.join(SUPPORTED_LAYOUTS)})")
    if resize not in SUPPORTED_RESIZE:
        raise ClassifyError(f"unsupported resize mode {resize!r} (supported: {', '.join(SUPPORTED_RESIZE)})")
    temperature = meta.get(META_PREFIX + "temperature", "1")
    try:
        temperature = float(temperature)
    except ValueError:
        raise ClassifyError(f"model metadata 'edgekd.temperature' is not a number: {temperature!r}") from None
    if not 0 < temperature < float("inf"):
        raise ClassifyError(f"model metadata 'edgekd.temperature' must be > 0, got {temperature!r}")
    short = meta.get(META_PREFIX + "resize_short", str(max(size[1:])))
    if not short.isdigit() or int(short) < max(size[1:]):
        raise ClassifyError(f"model metadata 'edgekd.resize_short' must be an integer >= the input size, got {short!r}")
    return {
        "temperature": temperature,
        "classes": [str(c) for c in classes],
        "input_size": tuple(size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "layout": layout,
        "resize": resize,
        "resize_short": int(short),
    }


# --------------------------------------------------------------------------- preprocessing


def as_rgb(im):
    """8-bit RGB as a viewer shows the image, as edgekd decoded the training images
    (edgekd.data.as_rgb): the EXIF orientation of a phone photo applied, 16-bit grey scaled to
    8 bits rather than clipped to white."""
    import numpy as np
    from PIL import Image, ImageOps

    if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        grey = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


@functools.cache
def _heif_opener() -> bool:
    """Teach Pillow iPhone photos (.heic) where pillow-heif is installed, once per process."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def preprocess(path: str, spec: dict):
    """Image file -> float32 array [C, H, W], normalised as the model expects."""
    import numpy as np
    from PIL import Image

    _, h, w = spec["input_size"]
    if not os.path.isfile(path):
        raise ClassifyError(f"image not found: {path}")
    _heif_opener()
    try:
        with Image.open(path) as im:
            im = as_rgb(im)
            if spec["resize"] == "resize":
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
            else:  # short side to resize_short, its centre square, then the centre h x w of that
                short = spec["resize_short"]
                iw, ih = im.size
                if (iw, ih) != (short, short):
                    scale = short / min(iw, ih)
                    iw, ih = max(short, round(iw * scale)), max(short, round(ih * scale))
                    im = im.resize((iw, ih), Image.BILINEAR)
                left, top = (iw - short) // 2 + (short - w) // 2, (ih - short) // 2 + (short - h) // 2
                im = im.crop((left, top, left + w, top + h))
            x = np.asarray(im, dtype=np.float32) / 255.0
    except ClassifyError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, OSError...
        raise ClassifyError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)  # HWC -> CHW


def softmax(logits):
    import numpy as np

    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- model


def load_session(model_path: str, threads: int | None):
    import onnxruntime as ort

    if not os.path.isfile(model_path):
        raise ClassifyError(f"model not found: {model_path}")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only
    try:
        sess = ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClassifyError(f"cannot load model {model_path}: {msg}") from None
    meta = dict(sess.get_modelmeta().custom_metadata_map or {})
    return sess, meta


def load_tflite(model_path: str, threads: int | None):
    """A LiteRT interpreter (XNNPACK CPU delegate) as a function of a float32 batch, and the
    file's edgekd.* metadata read from its flatbuffer metadata table."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.interpreter import Interpreter

    if not os.path.isfile(model_path):
        raise ClassifyError(f"model not found: {model_path}")
    with open(model_path, "rb") as f:
        buf = f.read()
    try:
        model = fb.Model.GetRootAs(buf, 0)
        meta = {}
        for i in range(model.MetadataLength()):
            md = model.Metadata(i)
            b = model.Buffers(md.Buffer())
            raw = buf[b.Offset():b.Offset() + b.Size()] if b.Offset() > 1 else b.DataAsNumpy().tobytes()
            meta[(md.Name() or b"").decode()] = bytes(raw).decode("utf-8", "replace")
        saved = os.dup(2)  # LiteRT logs "INFO: Created TensorFlow Lite XNNPACK delegate" to fd 2 on every load
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
                it = Interpreter(model_content=buf, num_threads=threads)
                it.allocate_tensors()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClassifyError(f"cannot load model {model_path}: {msg}") from None
    inp, out = it.get_input_details()[0], it.get_output_details()[0]

    def run(batch):
        rows = []
        n = int(inp["shape"][0])
        for i in range(0, len(batch), n):  # edgekd's .tflite files take one image at a time
            x = batch[i:i + n]
            if np.dtype(inp["dtype"]).kind in "iu":
                scale, zero = inp["quantization"]
                info = np.iinfo(inp["dtype"])
                x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
            it.set_tensor(inp["index"], x)
            it.invoke()
            y = it.get_tensor(out["index"])
            if np.dtype(out["dtype"]).kind in "iu":
                scale, zero = out["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            rows.append(np.array(y, dtype=np.float32))
        return np.concatenate(rows)

    return run, meta


def classify(model_path: str, images: list[str], top_k: int = 5, threads: int | None = None) -> list[dict]:
    import numpy as np

    if model_path.lower().endswith(".tflite"):
        run, meta = load_tflite(model_path, threads)
    else:
        sess, meta = load_session(model_path, threads)
        name = sess.get_inputs()[0].name
        run = lambda batch: sess.run(None, {name: batch})[0]  # noqa: E731
    spec = parse_metadata(meta)
    batch = np.stack([preprocess(p, spec) for p in images], axis=0)
    try:
        logits = run(batch)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClassifyError(f"inference failed: {msg}") from None
    logits = np.asarray(logits).reshape(len(images), -1)
    classes = spec["classes"]
    if logits.shape[1] != len(classes):
        raise ClassifyError(f"model outputs {logits.shape[1]} scores but metadata lists {len(classes)} classes")
    probs = softmax(logits / spec["temperature"])
    k = max(1, min(top_k, len(classes)))
    results = []
    for path, p in zip(images, probs):
        order = np.argsort(-p, kind="stable")[:k]
        results.append({
            "image": path,
            "top": [{"class": classes[i], "prob": float(p[i])} for i in order],
        })
    return results


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog=PROG, description="Classify images with an edgekd-exported model: ONNX "
                                               "(fp32 or int8 QDQ) with onnxruntime, .tflite with LiteRT.")
    p.add_argument("model", help="the .onnx, .ort or .tflite file written by edgekd")
    p.add_argument("images", nargs="+", help="image files (anything Pillow reads: JPEG, PNG, ...)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="inference threads (default: the runtime's choice)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.top_k < 1:
            raise ClassifyError("--top-k must be >= 1", code=2)
        if args.threads is not None and args.threads < 1:
            raise ClassifyError("--threads must be >= 1", code=2)
        try:
            results = classify(args.model, args.images, top_k=args.top_k, threads=args.threads)
        except ImportError as e:
            raise ClassifyError(f"{e} (pip install -r requirements.txt)") from None
    except ClassifyError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # anything unexpected: still one line, no traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{PROG}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["image"])
            for t in r["top"]:
                print(f"  {t['prob'] * 100:6.2f}%  {t['class']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
