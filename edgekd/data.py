"""Datasets as pre-decoded uint8 tensors.

JPEG decoding dominates CPU training time on small images, so every split is decoded
once into a uint8 N x C x H x W array and cached on disk under a key derived from the
input *bytes* (every image file's, in a folder or a tar or zip archive: edgekd.archive), never from a name.
Augmentation (padded random crop, horizontal flip) then runs on whole batches of tensors.

Images keep their aspect ratio: each is resized so its short side is `data.store_size`
(default `data.image_size`) and centre-cropped to a square. With a store size larger than the
image size, training takes its random (resized) crops of `image_size` from the whole stored
image while evaluation sees its centre crop, torchvision's Resize(256) + CenterCrop(224)
without decoding anything twice.

A decoded split that fits comfortably in RAM (a quarter of it, at most 4 GiB: CIFAR-10 is
150 MB) is read into memory; a larger one is memory-mapped, so a dataset larger than RAM
trains with batches read through the page cache (`MappedImages`). The decode itself
streams to disk, so it never holds the split in memory either.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .archive import ARCHIVES, ArchiveEntry, open_archive
from .schema import DataConfig
from .errors import EdgekdError, InputError
from .fileio import atomic_path, save_torch

log = logging.getLogger("edgekd")

Folder = Path | ArchiveEntry  # an ImageFolder on disk, or inside an archive read into memory
IMG_EXTS = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif", ".avif", ".heic", ".heif"}
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")  # an ISO box file's ftyp brands


def map_above_bytes() -> int:
    """Decoded splits larger than this are memory-mapped rather than read into RAM."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 << 30
    return min(4 << 30, ram // 4)


class MappedImages:
    """A split's images when the decoded file is too large for RAM: a read-only memory map of
    the file and the rows this split holds. Indexing copies only the rows asked for, read
    through the page cache, so the process never holds the whole array; a selection (subset,
    validation split) is a new list of rows, not a copy of the pixels."""

    def __init__(self, base: torch.Tensor, rows: torch.Tensor | None = None, size: int | None = None,
                 path: Path | None = None):
        self.base, self.path = base, path  # path: the mapped file, mapped again (not copied) in another process
        self.rows = torch.arange(len(base)) if rows is None else rows
        self.size = size or base.shape[-1]  # a centre crop of this side, where smaller than the stored images

    @classmethod
    def map(cls, path: Path, shape: list[int], rows: torch.Tensor | None = None, size: int | None = None) -> "MappedImages":
        nbytes = int(np.prod(shape))
        return cls(torch.from_file(str(path), shared=False, size=nbytes, dtype=torch.uint8).view(shape), rows, size, path)

    def __reduce__(self):
        if self.path is None:
            return MappedImages, (self.base, self.rows, self.size)
        return MappedImages.map, (self.path, list(self.base.shape), self.rows, self.size)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), self.base.shape[1], self.size, self.size))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> torch.Tensor:
        rows = self.rows[key]
        return centre_crop(self.base[rows].clone() if rows.ndim == 0 else self.base[rows], self.size)

    def select(self, idx: torch.Tensor) -> "MappedImages":
        return MappedImages(self.base, self.rows[idx], self.size, self.path)

    def cropped(self, size: int) -> "MappedImages":
        return MappedImages(self.base, self.rows, size, self.path)


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size x size window of a ... x H x W batch: a view, no copy."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x if (h, w) == (size, size) else x[..., top : top + size, left : left + size]


@dataclass
class Split:
    images: torch.Tensor | MappedImages  # uint8, N x 3 x S x S: what evaluation sees (the centre crop of `stored`)
    labels: torch.Tensor  # int64, N
    classes: list[str]
    key: str = ""  # content hash: changes whenever the bytes (or the selection) change
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) left out by data.skip_bad_images
    stored: torch.Tensor | MappedImages | None = None  # the decoded images where larger than `images` (data.store_size)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def full(self) -> torch.Tensor | MappedImages:
        """The whole stored images, from which training crops are taken."""
        return self.images if self.stored is None else self.stored

    def select(self, idx: np.ndarray, tag: str) -> "Split":
        idx_t = torch.as_tensor(np.sort(idx), dtype=torch.long)
        key = hashlib.sha256(f"{self.key}/{tag}/{idx_t.numpy().tobytes().hex()}".encode()).hexdigest()
        full = self.full.select(idx_t) if isinstance(self.full, MappedImages) else self.full[idx_t]
        return Split.at_size(full, self.labels[idx_t], self.classes, key, self.skipped, self.size)

    def sample(self, n: int | None) -> "Split":
        """At most `n` of this split's images in its class proportions (a fixed seeded stratified
        subset), for every place that judges on part of a split: splits are stored class by
        class, so their first n images are the first classes only. The whole split where `n`
        covers it (or is None)."""
        if n is None or n >= len(self):
            return self
        return self.select(stratified_indices(self.labels.numpy(), n, SAMPLE_SEED), f"sample{n}")

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @staticmethod
    def at_size(full, labels, classes, key, skipped, size: int) -> "Split":
        """A split whose stored images `full` are seen at `size` (their centre crop) outside training."""
        if full.shape[-1] == size:
            return Split(full, labels, classes, key, skipped)
        view = full.cropped(size) if isinstance(full, MappedImages) else centre_crop(full, size)
        return Split(view, labels, classes, key, skipped, stored=full)


@dataclass
class Data:
    train: Split
    test: Split
    val: Split | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: str = "crop_flip"
    batch_size: int = 128
    eval_batch_size: int = 256
    sampling: str = "uniform"  # data.sampling: how a training pass draws its images (iterate)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Images left out of the train and test folders (data.skip_bad_images), for the manifest and
        report; once each where both splits come from one decode (data.test_split)."""
        unique = dict.fromkeys((f, why) for split in (self.train, self.test) for f, why in split.skipped)
        return [{"file": f, "reason": why} for f, why in unique]

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def store_size(self) -> int:
        """The short side images were resized to before their centre crop of image_size."""
        return int(self.train.full.shape[-1])

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        mean, std = _channel_constants(tuple(self.mean), tuple(self.std), x_uint8.device)
        return (x_uint8.float() / 255.0 - mean) / std


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as 1x3x1x1 tensors on `device`, made once: building them from Python lists on
    every batch is a blocking host-to-GPU copy, which keeps the host from queueing the next step."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (random draws, labels) on `device` without making the host wait for the
    GPU: from pinned memory the copy is queued on the stream like any kernel."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def cache_root(cfg_dir: str | None = None) -> Path:
    root = cfg_dir or os.environ.get("EDGEKD_CACHE") or "~/.cache/edgekd"
    return Path(root).expanduser()


# ----------------------------------------------------------------------------- sources


def _find_split_dir(root: Folder, wanted: str | None, candidates: tuple[str, ...], hint: str = "") -> Folder:
    found = _split_dir(root, wanted, candidates)
    if found is None:
        raise InputError(f"{root}: no '{candidates[0]}' folder found (ImageFolder layout: {candidates[0]}/<class>/<image>)"
                         f"{hint}")
    return found


def _split_dir(root: Folder, wanted: str | None, candidates: tuple[str, ...]) -> Folder | None:
    if wanted:
        p = root / wanted
        if not p.is_dir():
            raise InputError(f"{p}: split folder not found")
        return p
    for depth_root in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not _not_data(p.name))]:
        for name in candidates:
            if (depth_root / name).is_dir():
                return depth_root / name
    return None


def _unwrap(root: Folder) -> Folder:
    """The source's content: the source itself, or the one folder it wraps it in (an archive of
    `flowers/<class>/...` or `kaggle/{train.csv,train/}`). A lone class folder could not train a
    classifier, so a lone folder is a wrapper."""
    while True:
        children = [p for p in root.iterdir() if not _not_data(p.name)]
        if len(children) != 1 or not children[0].is_dir():
            return root
        root = children[0]


def check_layout(root: Path, cfg: DataConfig) -> None:
    """What `edgekd validate` can tell of a folder source without decoding it: its train and test
    folders, or its label files, are there, and a class-names file names every class folder (the
    same errors a run would give)."""
    if cfg.labels:
        inside = _labels_root(root, cfg.labels, "labels")
        if cfg.test_labels:
            _labels_root(inside, cfg.test_labels, "test_labels")
    else:
        train, _ = _split_dirs(root, cfg)
    if cfg.class_names:
        names = class_names_file(root, cfg.class_names)
        read_class_names(names, [] if cfg.labels else _class_folders(train))  # its format; every class folder named


def _labels_root(root: Folder, rel: str, key: str) -> Folder:
    """The folder `rel` (data.labels) is read from: the source, or the one folder it wraps its
    content in (`_unwrap`)."""
    for inside in (root, _unwrap(root)):
        if (inside / rel).is_file():
            return inside
    raise InputError(f"data.{key}: {rel} not found in {root}")


def class_names_file(root: Folder | None, rel: str) -> Folder:
    """data.class_names: the file inside the source (or the folder it wraps its content in, as
    data.labels), else `rel` as a path of its own."""
    for inside in (root, _unwrap(root)) if root is not None else ():
        if (inside / rel).is_file():
            return inside / rel
    if (own := Path(rel).expanduser()).is_file():
        return own
    raise InputError(f"data.class_names: {rel} not found" + (f" in {root} nor" if root is not None else "") +
                     " as a file of its own (expected a text file of '<class> <name>' lines)")


def read_class_names(path: Folder, classes: list[str]) -> list[str]:
    """The readable name of each of `classes` from a data.class_names file: one '<class> <name>'
    a line, split at the first tab where the line has one, else at the first run of spaces;
    blank lines and '#' comments skipped. The file may name more classes than the data has
    (ImageNet's 1,000 for a subset of them); every class of the data must be named, and no two
    with the same name (a phone app could not tell them apart)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"data.class_names: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    names: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, name = line.partition("\t") if "\t" in line else line.partition(" ")
        if not name.strip():
            raise InputError(f"data.class_names: {path} line {n}: expected '<class> <name>', got {line[:60]!r}")
        names[key.strip()] = name.strip()
    missing = [c for c in classes if c not in names]
    if missing:
        raise InputError(f"data.class_names: {path} names no {', '.join(repr(c) for c in missing[:5])}"
                         f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''} of the data's "
                         f"{len(classes)} classes (expected a '<class> <name>' line for each)")
    shown = [names[c] for c in classes]
    if len(set(shown)) < len(shown):
        twice = next(s for s in shown if shown.count(s) > 1)
        raise InputError(f"data.class_names: {path} names {', '.join(c for c in classes if names[c] == twice)} "
                         f"all {twice!r}; each class needs a name of its own")
    return shown


def _split_dirs(root: Folder, cfg: DataConfig) -> tuple[Folder, Folder | None]:
    """The train and test folders; no test folder where data.test_split holds the test images
    out of train."""
    tests = ("test", "val", "validation")
    if not cfg.test_split:
        hint = "; for a folder with no test split, set data.test_split (e.g. 0.2) to hold part of train out"
        return (_find_split_dir(root, cfg.train_dir, ("train",), hint if _split_dir(root, None, tests) is None else ""),
                _find_split_dir(root, cfg.test_dir, tests, hint))
    train, test = _split_dir(root, cfg.train_dir, ("train",)), _split_dir(root, None, tests)
    if test is not None:
        raise InputError(f"data.test_split: {root} has a test folder of its own ({test}); leave data.test_split out "
                         "to test on it")
    return (train if train is not None else _unwrap(root)), None


FILE_COLUMNS = ("file_name", "filename", "file", "path", "image", "image_id", "id")  # data.labels: first found
CLASS_COLUMNS = ("label", "class", "category", "target")
GUESSED_SUFFIXES = (".jpg", ".jpeg", ".png")  # a file column of bare ids (Kaggle's labels.csv) names id + one of these


def _labelled_files(root: Folder, rel: str, key: str, base_dir: str | None, cfg: DataConfig,
                    classes: list[str] | None = None) -> tuple[Folder, list[Folder], list[int], list[str], list]:
    """The images a label file names and their classes: (folder the files are under, files,
    labels, classes, [(missing file, why)]). `rel` is a CSV inside the source with a header row; one column names each
    image (relative to `base_dir` where set, else to the CSV's folder; a bare id may leave out
    the suffix), one its class (data.label_columns, or the first of FILE_COLUMNS / CLASS_COLUMNS
    found). Classes are sorted (as numbers where all are integers); a test label file is held to
    the train file's `classes`. A row whose image is missing is an error naming it, or with
    data.skip_bad_images a listed skip."""
    import csv

    path = _labels_root(root, rel, key) / rel
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # a spreadsheet saved on Windows: cp1252, which decodes any byte but five
        text = raw.decode("cp1252", errors="replace")
    try:  # a spreadsheet in a locale with decimal commas separates with ';', a TSV with tabs
        dialect = csv.Sniffer().sniff(text[:65536], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    try:
        rows = [r for r in csv.reader(io.StringIO(text), dialect) if any(c.strip() for c in r)]
    except csv.Error as e:
        raise InputError(f"data.{key}: {path} is not a readable CSV file ({e})") from None
    if len(rows) < 2:
        raise InputError(f"data.{key}: {path} holds no rows under its header")
    header = [c.strip() for c in rows[0]]
    lower = [c.lower() for c in header]
    wanted = cfg.label_columns or [next((c for c in names if c in lower), None) for names in (FILE_COLUMNS, CLASS_COLUMNS)]
    cols = []
    for name, what, names in zip(wanted, ("file", "class"), (FILE_COLUMNS, CLASS_COLUMNS)):
        if name is None or name.lower() not in lower:
            expected = f"{name!r}" if name else "one of " + ", ".join(names)
            raise InputError(f"data.{key}: {path} has no {what} column {expected} (its columns: {', '.join(header)}); "
                             "name them with data.label_columns: [file column, class column]")
        cols.append(lower.index(name.lower()))
    base = root / base_dir if base_dir else path.parent
    files, names, missing = [], [], []
    for i, row in enumerate(rows[1:], start=2):
        name, label = (row[c].strip() if c < len(row) else "" for c in cols)
        name = name.replace("\\", "/")  # written on Windows
        if not name or not label:
            raise InputError(f"data.{key}: {path} row {i} has no {'file' if not name else 'class'}")
        f = base / name
        if not f.is_file():
            f = next((base / (name + x) for x in GUESSED_SUFFIXES if (base / (name + x)).is_file()), None)
        if f is None:
            missing.append((f"{base / name}", f"named on row {i} of {path}, not found"))
            continue
        files.append(f)
        names.append(label)
    if missing and not cfg.skip_bad_images:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"data.{key}: {missing[0][0]} ({missing[0][1]}){more}; fix it or set data.skip_bad_images: true")
    if classes is None:
        found = set(names)
        classes = sorted(found, key=int) if all(_is_int(c) for c in found) else sorted(found)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise InputError(f"data.{key}: {path} has classes the train labels do not: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    return base, files, [index[c] for c in names], classes, missing


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _not_data(name: str) -> bool:
    """Files and folders a desktop leaves beside the images, never images of the dataset:
    hidden ones (macOS's `._photo.jpg` resource forks, which carry the image's suffix but not an
    image, and `.DS_Store`), and the `__MACOSX` folder of a zip made by macOS's Finder."""
    return name.startswith(".") or name == "__MACOSX"


def _class_folders(folder: Folder) -> list[str]:
    """The classes of an ImageFolder split, in label order."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not _not_data(d.name))


def _list_image_folder(folder: Folder) -> tuple[list[Folder], list[int], list[str]]:
    classes = _class_folders(folder)
    if not classes:
        raise InputError(f"{folder}: no class folders found (ImageFolder layout: <class>/<image>)")
    files, labels, left, other = [], [], 0, Counter()
    for ci, c in enumerate(classes):
        for f in sorted((folder / c).rglob("*")):
            if not f.is_file():
                continue
            if any(_not_data(part) for part in f.relative_to(folder / c).parts):
                left += f.suffix.lower() in IMG_EXTS
            elif f.suffix.lower() in IMG_EXTS:
                files.append(f)
                labels.append(ci)
            else:
                other[f.suffix.lower() or "no suffix"] += 1
    if left:
        log.info("%s: left out %d hidden image file(s) (names or folders starting with '.', e.g. macOS's ._*)",
                 folder, left)
    if other:  # a format edgekd does not read (or a typo'd suffix) would otherwise vanish without a word
        log.warning("%s: left out %d file(s) whose suffix is not an image's (%s); images are %s", folder,
                    other.total(), ", ".join(f"{k}: {n}" for k, n in other.most_common()),
                    " ".join(sorted(IMG_EXTS)))
    if not files:
        raise InputError(f"{folder}: no image files found")
    return files, labels, classes


def _decode(args: tuple[str | bytes, int, int]) -> np.ndarray | str:
    """One image (a file, or the bytes of an archive member) as uint8 3 x size x size, as it is
    shown (`as_rgb`): short side resized to `size` (bilinear), centre crop."""
    from PIL import Image

    src, size, max_pixels = args
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own bomb check then agrees with ours
    heif = _heif_opener()
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            w, h = im.size
            if w * h > max_pixels:  # the header alone: nothing decoded yet
                return f"{w}x{h} pixels, over data.max_image_pixels ({max_pixels:,})"
            im = as_rgb(im)
            w, h = im.size
            if (w, h) != (size, size):
                scale = size / min(w, h)
                w, h = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((w, h), Image.BILINEAR)
            pixels = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
            top, left = (h - size) // 2, (w - size) // 2
            return pixels[:, top : top + size, left : left + size].copy()
    except Exception as e:  # PIL raises many types for corrupt files
        if not heif and _is_heif(src):
            return "a HEIC/HEIF photo, which Pillow reads with pillow-heif: pip install 'edgekd[heic]'"
        return f"{type(e).__name__}: {e}"


@functools.cache
def _heif_opener() -> bool:
    """Teach Pillow HEIC/HEIF (iPhone photos) where pillow-heif is installed, once per process
    (decoding runs in worker processes)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _is_heif(src: str | bytes) -> bool:
    if isinstance(src, str):
        with open(src, "rb") as f:
            src = f.read(12)
    return src[4:8] == b"ftyp" and src[8:12] in HEIF_BRANDS


ORIENTATION = 0x0112  # the EXIF tag
DECODE = "exif_upright grey16_scaled"  # what `as_rgb` does, in the cache key: a decoded split made without it is not reused


def as_rgb(im):
    """A PIL image as 8-bit RGB the way a viewer shows it. Phone cameras store a photo sideways
    with an EXIF orientation tag, so the tag is applied (as a gallery app, and the camera's own
    preview an app classifies, show it); PIL's `convert("RGB")` clips 16-bit grey (16-bit PNG
    or TIFF) to white, so those are scaled to 8 bits. deploy/python/classify.py does the same."""
    from PIL import Image, ImageOps

    if im.getexif().get(ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        grey = np.asarray(im, dtype=np.float64) / 257.0  # 65535 -> 255
        im = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def _check_classes(folder: Folder, labels: torch.Tensor, classes: list[str]) -> None:
    """A split a classifier cannot be trained or judged on is refused, not run to 100 %."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    filled = [c for c, n in zip(classes, counts) if n]
    if len(filled) < 2:
        held = f"only {filled[0]!r} holds" if filled else "no class holds"
        raise InputError(f"{folder}: {held} readable images; a classifier needs at least two classes with images")
    for c, n in zip(classes, counts):
        if not n:
            log.warning("%s: class %r holds no readable images", folder, c)


def _load_image_folder(folder: Folder, cfg: DataConfig, cache: Path) -> Split:
    return _decode_split(folder, *_list_image_folder(folder), cfg, cache)


def _decode_split(folder: Folder, files: list[Folder], labels: list[int], classes: list[str], cfg: DataConfig,
                  cache: Path, missing: list[tuple[str, str]] = ()) -> Split:
    """Decode `files` (labels index `classes`) into the cache, or read them from it: keyed on each
    file's place under `folder`, its class (a label file gives classes no path holds) and its
    bytes. A label file passes the files it names but lacks as `missing`, skipped like
    unreadable ones."""
    store = cfg.store_size or cfg.image_size
    h = hashlib.sha256(f"size={store} fit=short_side_centre_crop skip_bad={cfg.skip_bad_images} "
                       f"max_pixels={cfg.max_image_pixels} decode={DECODE}".encode())
    h.update(repr([f[len(str(folder)):] for f, _ in missing]).encode())  # where the folder is does not count
    for f, label in zip(files, labels):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f"\0class={classes[label]}\0".encode())
        h.update(f.read_bytes())
    key = h.hexdigest()
    pixels, meta_path = cache / "tensors" / f"{key[:32]}.u8", cache / "tensors" / f"{key[:32]}.meta.pt"
    split = _read_decoded(pixels, meta_path, key, cfg.image_size)
    if split is not None:
        _warn_skipped(split.skipped)
        _check_classes(folder, split.labels, split.classes)
        return split
    from tqdm import tqdm

    _check_free_space(pixels.parent, len(files) * 3 * store * store)
    jobs = [(f.read_bytes() if isinstance(f, ArchiveEntry) else str(f), store, cfg.max_image_pixels) for f in files]
    workers = min(4, os.cpu_count() or 1)
    keep, bad = [], list(missing)
    # pixels stream to the file as they are decoded (in order); it takes its name only when complete
    with atomic_path(pixels) as tmp, open(tmp, "wb") as out, ProcessPoolExecutor(workers) as ex:
        for i, r in enumerate(tqdm(ex.map(_decode, jobs, chunksize=64), total=len(jobs), desc=f"decode {folder.name}",
                                   unit="img", leave=False)):
            if isinstance(r, str):
                bad.append((str(files[i]), r))
            else:
                keep.append(i)
                out.write(r.tobytes())
        if bad and not cfg.skip_bad_images:
            f, why = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise InputError(f"{f}: unreadable image ({why}){more}; fix it or set data.skip_bad_images: true")
        if not keep:
            raise InputError(f"{folder}: none of its {len(files)} images is readable")
        labels_t = torch.tensor([labels[i] for i in keep], dtype=torch.long)
        _check_classes(folder, labels_t, classes)
        out.flush()
        os.fsync(out.fileno())
    _warn_skipped(bad)
    shape = [len(keep), 3, store, store]
    save_torch(meta_path, {"shape": shape, "labels": labels_t, "classes": classes, "skipped": [list(b) for b in bad]})
    split = _read_decoded(pixels, meta_path, key, cfg.image_size)
    if split is None:
        raise EdgekdError(f"{pixels}: the decoded images just written cannot be read back")
    return split


def _check_free_space(folder: Path, nbytes: int) -> None:
    """Refuse a decode the disk cannot hold before spending minutes on it (a disk that fills
    during the decode anyway fails the write, and the partial file is removed: fileio)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise EdgekdError(f"{folder}: the decoded images need {nbytes:,} bytes but {free:,} are free; free space, "
                          "set data.cache_dir to a larger disk, or lower data.store_size / data.image_size")


def _read_decoded(pixels: Path, meta_path: Path, key: str, size: int) -> Split | None:
    """A decoded split from the cache, or None where it is absent or incomplete. The metadata is
    written after the pixel file is complete, and the pixel file's size must match it, so an
    interrupted decode is never read as valid."""
    if not (meta_path.exists() and pixels.exists()):
        return None
    try:
        meta = torch.load(meta_path, weights_only=True)
        shape = [int(s) for s in meta["shape"]]
        nbytes = int(np.prod(shape))
        if pixels.stat().st_size != nbytes or len(meta["labels"]) != shape[0]:
            raise ValueError(f"{pixels.stat().st_size} bytes, expected {nbytes}")
        if nbytes > map_above_bytes():
            images = MappedImages.map(pixels, shape)
        else:
            images = torch.from_numpy(np.fromfile(pixels, dtype=np.uint8).reshape(shape))
    except Exception as e:
        log.warning("decoded-image cache %s is unreadable (%s); decoding again", pixels, str(e).splitlines()[0][:120])
        return None
    return Split.at_size(images, meta["labels"], list(meta["classes"]), key, [tuple(b) for b in meta["skipped"]], size)


def _warn_skipped(bad: list[tuple[str, str]]) -> None:
    """Every run says what it skipped, whether it decoded the images or read them from the cache."""
    for f, why in bad:
        log.warning("skipping unreadable image %s (%s)", f, why)


def _load_torchvision(name: str, cfg: DataConfig, train: bool) -> Split:
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    root = Path(cfg.root).expanduser()
    try:
        ds = cls(str(root), train=train, download=cfg.download)
    except RuntimeError as e:
        hint = "" if cfg.download else " (set data.download: true to fetch it)"
        raise InputError(f"data.source {name}: {e}{hint}") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    store = cfg.store_size or cfg.image_size
    if images.shape[-1] != store:
        images = F.interpolate(images.float(), size=store, mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    labels = torch.tensor(ds.targets, dtype=torch.long)
    key = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()  # every byte it stands for
    return Split.at_size(images, labels, list(ds.classes), key, [], cfg.image_size)


# ----------------------------------------------------------------------------- selection


SAMPLE_SEED = 0  # Split.sample: the same images for every stage and run, so figures stay comparable
TEST_SPLIT_SEED = 0  # data.test_split: the same test images for every run and seed, as a test folder would be


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded subset of `n` indices whose class proportions match `labels`."""
    n = min(n, len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota))[: n - quota.sum()]:
        quota[i] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


IMBALANCED = 3.0  # largest / smallest train class at which a uniform run is told of data.sampling: balanced


def imbalance(data: Data) -> str | None:
    """One line for a train split whose largest class is IMBALANCED times its smallest or more and
    that trains uniformly: a model trained on it learns to favour the large classes, which the
    report's per-class table shows and data.sampling: balanced counters."""
    counts = torch.bincount(data.train.labels, minlength=data.num_classes)
    big, small = int(counts.argmax()), int(counts.argmin())
    if data.sampling != "uniform" or counts[big] < IMBALANCED * max(1, int(counts[small])):
        return None
    return (f"train classes differ in size: {data.classes[big]!r} has {int(counts[big])} images, "
            f"{data.classes[small]!r} {int(counts[small])}; data.sampling: balanced trains every class equally often")


def load_data(cfg: DataConfig, seed: int) -> Data:
    cache = cache_root(cfg.cache_dir)
    src = cfg.source
    shown = None  # data.class_names: the classes' readable names, read once, checked before anything is decoded
    if src.lower() in ("cifar10", "cifar100"):
        train, test = _load_torchvision(src.lower(), cfg, True), _load_torchvision(src.lower(), cfg, False)
        if cfg.class_names:
            shown = read_class_names(class_names_file(None, cfg.class_names), train.classes)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise InputError(f"data.source: {path} does not exist")
        if path.is_file():
            if not path.name.lower().endswith(ARCHIVES):
                raise InputError(f"data.source: {path} is a file but not a {'/'.join(ARCHIVES)} archive")
            path = open_archive(path, cache, cfg.archive)
        names = class_names_file(path, cfg.class_names) if cfg.class_names else None
        if cfg.labels:
            path = _labels_root(path, cfg.labels, "labels")
            train_dir, files, labels, classes, missing = _labelled_files(path, cfg.labels, "labels", cfg.train_dir, cfg)
            shown = read_class_names(names, classes) if names else None
            train = _decode_split(train_dir, files, labels, classes, cfg, cache, missing)
            test_dir = test = None
            if cfg.test_labels:
                test_dir, files, labels, _, missing = _labelled_files(path, cfg.test_labels, "test_labels", cfg.test_dir,
                                                                      cfg, train.classes)
                test = _decode_split(test_dir, files, labels, train.classes, cfg, cache, missing)
        else:
            train_dir, test_dir = _split_dirs(path, cfg)
            shown = read_class_names(names, _class_folders(train_dir)) if names else None
            train = _load_image_folder(train_dir, cfg, cache)
            test = _load_image_folder(test_dir, cfg, cache) if test_dir is not None else None
        if test is None:
            held = stratified_indices(train.labels.numpy(), max(1, round(len(train) * cfg.test_split)), TEST_SPLIT_SEED)
            test = train.select(held, f"test_split{cfg.test_split}")
            train = train.select(np.setdiff1d(np.arange(len(train)), held), f"train_split{cfg.test_split}")
        if train.classes != test.classes:
            raise InputError(f"{train_dir} and {test_dir} have different class folders")
    if cfg.num_classes is not None and cfg.num_classes != len(train.classes):
        raise InputError(f"data.num_classes is {cfg.num_classes} but {src} has {len(train.classes)} classes")
    if shown is not None:
        train.classes = test.classes = shown
    if cfg.subset:
        train = train.select(stratified_indices(train.labels.numpy(), cfg.subset, seed), f"subset{cfg.subset}s{seed}")
    if cfg.test_subset:
        test = test.select(stratified_indices(test.labels.numpy(), cfg.test_subset, seed), f"subset{cfg.test_subset}s{seed}")
    val = None
    if cfg.val_split > 0:
        n_val = max(1, int(round(len(train) * cfg.val_split)))
        val_idx = stratified_indices(train.labels.numpy(), n_val, seed + 1)
        rest = np.setdiff1d(np.arange(len(train)), val_idx)
        val, train = train.select(val_idx, "val"), train.select(rest, "trainrest")
    augment = cfg.augment
    if augment == "crop_flip" and (cfg.crop == "resized" or (cfg.crop == "auto" and train.images.shape[-1] >= RESIZED_CROP_FROM)):
        augment = "resized_crop_flip"
    return Data(train, test, val, cfg.mean, cfg.std, augment, cfg.batch_size, cfg.eval_batch_size, cfg.sampling)


# ----------------------------------------------------------------------------- batches


RESIZED_CROP_FROM = 64  # data.crop auto: images this large get random-resized crops, smaller ones padded crops
RESIZED_CROP_SCALE = (0.35, 1.0)  # fraction of the image area a random-resized crop keeps
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def resized_crop_boxes(b: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """b random-resized-crop boxes (x1, y1, x2, y2) in pixels: area a uniform fraction of the
    image in RESIZED_CROP_SCALE, log-uniform aspect ratio in RESIZED_CROP_RATIO, uniform position;
    torchvision's RandomResizedCrop sampling, vectorised, with a box that does not fit clamped to
    the image instead of redrawn."""
    area = h * w * (RESIZED_CROP_SCALE[0] + (RESIZED_CROP_SCALE[1] - RESIZED_CROP_SCALE[0]) * torch.rand(b, generator=gen))
    lo, hi = torch.log(torch.tensor(RESIZED_CROP_RATIO))
    ratio = torch.exp(lo + (hi - lo) * torch.rand(b, generator=gen))
    cw = torch.sqrt(area * ratio).clamp(1, w)
    ch = torch.sqrt(area / ratio).clamp(1, h)
    x1 = (w - cw) * torch.rand(b, generator=gen)
    y1 = (h - ch) * torch.rand(b, generator=gen)
    return torch.stack([x1, y1, x1 + cw, y1 + ch], dim=1)


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator, pad: int = 4,
                  size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop (reflect-padded by `pad` where the images are no larger than `size`) or
    random-resized crop, and/or horizontal flip, on a uint8/float batch of stored images; crops
    come out at `size` x `size` (default: the images' own size), a flip alone at the size given.

    Returns the batch and a bool mask of flipped samples (teacher-logit caches use it)."""
    b = x.shape[0]
    h, w = x.shape[-2:]
    oh, ow = (size, size) if size else (h, w)
    flip = torch.zeros(b, dtype=torch.bool)
    if mode == "none":
        return x, flip
    if mode == "resized_crop_flip":  # every crop resampled to the input size in one batched bilinear op
        from torchvision.ops import roi_align

        boxes = torch.cat([torch.arange(b, dtype=torch.float32)[:, None], resized_crop_boxes(b, h, w, gen)], dim=1)
        x = roi_align(x.float(), to_device(boxes, x.device), output_size=(oh, ow), spatial_scale=1.0, sampling_ratio=2,
                      aligned=True)
    elif mode == "crop_flip":
        pad = pad if (h, w) == (oh, ow) else 0  # stored images larger than the crop need no padding
        padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect") if pad else x.float()
        dev = x.device
        oy = to_device(torch.randint(0, h + 2 * pad - oh + 1, (b,), generator=gen), dev)
        ox = to_device(torch.randint(0, w + 2 * pad - ow + 1, (b,), generator=gen), dev)
        rows = (oy[:, None] + torch.arange(oh, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(ow, device=dev))[:, None, None, :]
        x = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(x.shape[1], device=dev)[None, :, None, None],
                   rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(to_device(flip, x.device)[:, None, None, None], x.flip(-1), x)
    return x, flip


def train_batches(n: int, batch_size: int, ranks: int = 1) -> int:
    """Batches of a shuffled pass over n images (iterate); split over several ranks, whole
    batches only, so every rank takes the same number of steps."""
    if ranks > 1:
        return n // batch_size
    return n // batch_size + (n % batch_size > 1 or n < batch_size)


def balanced_draw(labels: torch.Tensor, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """`n` indices into `labels` drawn with replacement, each weighted by one over its class's
    size: every class as likely as any other (data.sampling: balanced)."""
    counts = torch.bincount(labels)
    return torch.multinomial(1.0 / counts[labels].double(), n, replacement=True, generator=gen)


def iterate(split: Split, batch_size: int, shuffle: bool = False, augment: str = "none", gen: torch.Generator | None = None,
            device: torch.device | None = None, prefetch: bool = False, shard: tuple[int, int] = (0, 1),
            sampling: str = "uniform"):
    """Yield (uint8-or-float images, labels, indices, flipped mask) batches from a Split: random
    crops from the stored images, otherwise the centre crops evaluation sees. A shuffled (training)
    pass leaves out a last batch of one image, which BatchNorm cannot train on; the permutation
    of the next epoch puts that image elsewhere.

    With `device`, each batch travels as uint8 (a quarter of the float bytes; pinned for a GPU)
    and is cropped and flipped there, on whole batches; with `prefetch`, a thread reads the next
    batch's pixels (from RAM or the memory map) while the current one trains. Random draws stay
    on the CPU generator, in the same order, so a seed gives the same crops on any device.

    `shard` = (rank, ranks) of a torchrun group (dist): every rank draws the same permutation and
    takes every ranks-th image of each global batch; its crops come from a generator of its own.

    A shuffled pass with `sampling="balanced"` (data.sampling) draws its n images with replacement,
    each with weight one over its class's size, so every class is as likely as any other."""
    n = len(split)
    if shuffle and sampling == "balanced":
        order = balanced_draw(split.labels, n, gen)
    else:
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    crops = augment in ("crop_flip", "resized_crop_flip")
    source = split.full if crops else split.images
    pin = device is not None and device.type == "cuda"
    rank, ranks = shard
    end = train_batches(n, batch_size, ranks) * batch_size if shuffle else n
    batches = [order[s : s + batch_size][rank::ranks] for s in range(0, end, batch_size)]
    if ranks > 1 and gen is not None:
        gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)) + rank)

    def read(idx: torch.Tensor) -> torch.Tensor:
        x = source[idx]
        return x.pin_memory() if pin else x

    for idx, x in zip(batches, _ahead(read, batches) if prefetch else map(read, batches)):
        if device is not None:
            x = x.to(device, non_blocking=True)
        if augment != "none":  # crops come out at the size evaluation sees; a flip keeps the size it is given
            x, flip = augment_batch(x, augment, gen, size=split.size)
        else:
            flip = torch.zeros(len(idx), dtype=torch.bool)
        yield x, split.labels[idx], idx, flip


def _ahead(fn, items: list):
    """fn(item) for each item, computed one item ahead in a thread (tensor indexing and page-cache
    reads release the GIL, so the next batch is read while this one trains)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="edgekd-batches") as pool:
        pending = pool.submit(fn, items[0]) if items else None
        for i in range(len(items)):
            result = pending.result()
            pending = pool.submit(fn, items[i + 1]) if i + 1 < len(items) else None
            yield result
