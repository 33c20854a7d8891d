"""Pipeline configuration: YAML loading, ${ENV:-default} interpolation, --set overrides,
and pydantic validation whose errors name the YAML key path (`stages[1].prune.target_macs`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .errors import ConfigError


def _fraction(v: float) -> float:
    if not 0.0 < v <= 1.0:
        raise ValueError("must be in (0, 1]")
    return v


Fraction = Annotated[float, AfterValidator(_fraction)]


def _yaml_switch(v: Any) -> Any:
    """YAML 1.1 reads a bare on/off as true/false; take either spelling."""
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_switch)]  # an auto/on/off option


class Strict(BaseModel):
    """Base for every config block: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ArchiveLimits(Strict):
    """Checked member by member as a tar archive is read, so a bomb stops before it fills the disk."""

    max_bytes: int | None = Field(None, gt=0, description="total unpacked bytes (default: no limit beyond max_ratio and free disk)")
    max_ratio: float = Field(100.0, gt=0, description="unpacked bytes per archive byte, beyond a 64 MiB allowance "
                                                      "(images do not compress; a bomb does, up to ~1000x)")
    max_files: int = Field(2_000_000, gt=0)


class DataConfig(Strict):
    source: str = Field(description="cifar10 | cifar100 | path to an ImageFolder dir | path to a tar archive of one (.tar.gz, .tar.xz, ...)")
    root: str = Field("~/.cache/edgekd/datasets", description="download folder for torchvision datasets")
    download: bool = False
    train_dir: str | None = Field(None, description="train sub-folder inside the folder/archive (auto: 'train')")
    test_dir: str | None = Field(None, description="test sub-folder inside the folder/archive (auto: 'test' or 'val')")
    image_size: int = Field(32, gt=0, description="images are resized to this square size when decoded")
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    num_classes: int | None = Field(None, gt=1, description="expected class count; checked against the data")
    subset: int | None = Field(None, gt=0, description="stratified, seeded subset of the train split")
    test_subset: int | None = Field(None, gt=0, description="stratified, seeded subset of the test split")
    val_split: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of train held out for validation")
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    augment: Literal["crop_flip", "flip", "none"] = "crop_flip"
    skip_bad_images: bool = False
    max_image_pixels: int = Field(64_000_000, gt=0, description="an image with more pixels is a bad image (decompression bombs)")
    archive: ArchiveLimits = Field(default_factory=ArchiveLimits, description="what an archive may unpack to")
    cache_dir: str | None = Field(None, description="decoded-tensor cache (default $EDGEKD_CACHE or ~/.cache/edgekd)")


class ModelConfig(Strict):
    arch: str = Field(description="torchvision classification architecture, e.g. resnet50, mobilenet_v2")
    num_classes: int | None = Field(None, gt=1, description="defaults to the data's class count")
    cifar_stem: bool = Field(False, description="adapt the stem to 32x32 inputs (see docs)")
    width_mult: float | None = Field(None, gt=0)
    checkpoint: str | None = Field(None, description="state_dict / edgekd checkpoint / TorchScript / .onnx (teachers) / pickled model (with trust_pickle)")
    pretrained: bool = Field(False, description="torchvision ImageNet weights (needs internet)")
    trust_pickle: bool = Field(False, description="allow a checkpoint that needs full unpickling: this runs code from "
                                                  "the file, so only for files whose source you trust")


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: all cores)")
    output_dir: str = "runs"
    data: DataConfig
    teacher: ModelConfig | None = None
    student: ModelConfig
    stages: list[dict[str, Any]] = Field(min_length=1)

    def stage_entries(self) -> list[tuple[str, BaseModel]]:
        """(stage type, validated stage config) in pipeline order."""
        return [self._validated[i] for i in range(len(self.stages))]

    _validated: dict[int, tuple[str, BaseModel]] = {}


# --------------------------------------------------------------------------- YAML budgets

MAX_YAML_BYTES = 1 << 20  # a pipeline is a few KB; anything near this is not one
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # counted with every alias expanded: a "billion laughs" file stops here


def _yaml_budget(text: str, what: str) -> None:
    """Refuse a document nested too deep or that expands (through anchors and aliases) to too
    many nodes, by walking PyYAML's event stream (flat, and nothing is built or expanded), so
    neither the recursive composer nor interpolate() ever sees it."""
    sizes: dict[str, int] = {}  # anchor -> expanded node count
    stack: list[list] = []  # open collections: [node count so far, anchor]
    total = 0

    def add(n: int) -> None:  # a finished node (n values once expanded) joins its parent
        nonlocal total
        if stack:
            stack[-1][0] += n
            count = stack[-1][0]
        else:
            total += n
            count = total
        if count > MAX_YAML_NODES:
            raise ConfigError(f"{what}: expands to more than {MAX_YAML_NODES:,} values (through anchors and aliases); "
                              "refused as a YAML bomb")

    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, yaml.ScalarEvent):
            if ev.anchor:
                sizes[ev.anchor] = 1
            add(1)
        elif isinstance(ev, yaml.AliasEvent):
            add(sizes.get(ev.anchor, 1))
        elif isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            stack.append([1, ev.anchor])
            if len(stack) > MAX_YAML_DEPTH:
                mark = ev.start_mark
                raise ConfigError(f"{what}: line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
        elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            n, anchor = stack.pop()
            if anchor:
                sizes[anchor] = n
            add(n)


def load_yaml(text: str, what: str) -> Any:
    """yaml.safe_load within the budgets above; YAML syntax errors propagate as yaml.YAMLError."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{what}: {len(text):,} characters, more than a pipeline file may hold ({MAX_YAML_BYTES:,})")
    _yaml_budget(text, what)
    return yaml.safe_load(text)


# --------------------------------------------------------------------------- helpers

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _path_str(loc: tuple | list) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def interpolate(obj: Any, loc: tuple = ()) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a parsed YAML tree."""
    if isinstance(obj, dict):
        return {k: interpolate(v, loc + (k,)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, loc + (i,)) for i, v in enumerate(obj)]
    if isinstance(obj, str):

        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise ConfigError(f"{_path_str(loc)}: environment variable ${{{var}}} is not set and has no default")

        return _ENV.sub(sub, obj)
    return obj


def _parse_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for seg in key.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", seg)
        if not m or (not m.group(1) and not m.group(2)):
            raise ConfigError(f"--set {key}: cannot parse key")
        if m.group(1):
            parts.append(m.group(1))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return parts


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set a.b=c`; a leading stage name (`distill.epochs=2`) addresses that stage."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE")
    key, value_text = assignment.split("=", 1)
    try:
        value = load_yaml(value_text, f"--set {key}") if value_text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment}: value is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    parts = _parse_key(key.strip())
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    stage_names = [next(iter(s)) for s in stages if isinstance(s, dict) and len(s) == 1]
    if isinstance(parts[0], str) and parts[0] not in raw and parts[0] in stage_names:
        idx = [i for i, n in enumerate(stage_names) if n == parts[0]]
        if len(idx) > 1:
            raise ConfigError(f"--set {key}: stage '{parts[0]}' appears {len(idx)} times; use stages[i].{key}")
        parts = ["stages", idx[0]] + parts
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        here = _path_str(parts[: i + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(f"--set {key}: {here} does not exist")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {here} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError(f"--set {key}: {_path_str(parts)} does not exist")
    elif not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {_path_str(parts[:-1])} is not a mapping")
    node[last] = value


def did_you_mean(word: str, options) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _keys_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the config block at `loc` (the parent of an unknown key)."""
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        ann = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model else []


def format_validation_error(err: ValidationError, prefix: tuple = (), model: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(e["loc"][-1], _keys_at(model, tuple(e["loc"])[:-1]))
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] not in ("missing", "extra_forbidden") and "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
        lines.append(f"{_path_str(loc)}: {msg}")
    return "; ".join(lines)


def validate(raw: Any) -> PipelineConfig:
    """Validate a parsed pipeline tree, stage configs included; raises ConfigError."""
    from .stages import STAGES

    if not isinstance(raw, dict):
        raise ConfigError(f"<root>: expected a mapping of pipeline keys, got {type(raw).__name__}")
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, (), PipelineConfig)) from None
    validated: dict[int, tuple[str, BaseModel]] = {}
    for i, entry in enumerate(cfg.stages):
        if len(entry) != 1:
            raise ConfigError(f"stages[{i}]: expected one stage name mapping to its options, got keys {sorted(entry)}")
        (name, opts), = entry.items()
        if name not in STAGES:
            raise ConfigError(f"stages[{i}]: unknown stage '{name}'{did_you_mean(name, STAGES.names())}; "
                              f"known: {', '.join(STAGES.names())}")
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise ConfigError(f"stages[{i}].{name}: expected a mapping of options, got {type(opts).__name__}")
        try:
            validated[i] = (name, STAGES.get(name).Config.model_validate(opts))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, ("stages", i, name), STAGES.get(name).Config)) from None
    for i, (name, scfg) in validated.items():  # a stage option that depends on the rest of the pipeline
        for key, why in getattr(scfg, "pipeline_problems", lambda _: [])(cfg):
            raise ConfigError(f"stages[{i}].{name}.{key}: {why}")
    needs_teacher = [n for n, c in validated.values() if getattr(c, "uses_teacher", lambda: False)()]
    if needs_teacher and cfg.teacher is None:
        raise ConfigError(f"teacher: required key is missing (stages {', '.join(needs_teacher)} use a distillation loss)")
    cfg._validated = validated
    check_inputs(cfg)
    return cfg


def check_inputs(cfg: PipelineConfig) -> None:
    """What can be known wrong before anything runs: an architecture that does not exist, a
    data source or checkpoint file that is not there (so a typo fails in a second with exit 2,
    not after the data has been decoded)."""
    src = cfg.data.source
    if src.lower() not in ("cifar10", "cifar100") and not _exists(Path(src).expanduser()):
        parent = Path(src).expanduser().parent
        near = did_you_mean(Path(src).name, [p.name for p in parent.iterdir()]) if _is_dir(parent) else ""
        raise ConfigError(f"data.source: {src} does not exist{near} (expected cifar10, cifar100, an ImageFolder "
                          "directory or a tar archive of one)")
    for role in ("student", "teacher"):
        m: ModelConfig | None = getattr(cfg, role)
        if m is None:
            continue
        onnx = bool(m.checkpoint) and m.checkpoint.lower().endswith(".onnx")
        if not onnx:
            known = _architectures()
            if m.arch not in known:
                raise ConfigError(f"{role}.arch: unknown architecture {m.arch!r}{did_you_mean(m.arch, known)} "
                                  "(expected a torchvision classification model, see torchvision.models.list_models())")
        if m.checkpoint:
            path = Path(m.checkpoint).expanduser()
            if not _is_file(path):
                near = did_you_mean(path.name, [p.name for p in path.parent.iterdir()]) if _is_dir(path.parent) else ""
                raise ConfigError(f"{role}.checkpoint: {m.checkpoint} does not exist{near}")
            if not onnx and not m.trust_pickle:  # opened as the run will open it: weights only, nothing executed
                from .safeload import open_checkpoint

                open_checkpoint(path, f"{role}.checkpoint {path}", False, f"{role}.trust_pickle", mmap=True)


def _exists(p: Path) -> bool:
    """Path.exists without its exceptions: a name too long or holding a NUL byte is not there."""
    try:
        return p.exists()
    except (OSError, ValueError):
        return False


def _is_file(p: Path) -> bool:
    return _exists(p) and p.is_file()


def _is_dir(p: Path) -> bool:
    return _exists(p) and p.is_dir()


def _architectures() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def load_pipeline(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[PipelineConfig, dict]:
    """Read, interpolate, override and validate a pipeline file; returns (config, resolved raw tree)."""
    path = Path(path)
    if not _is_file(path):
        raise ConfigError(f"{path}: pipeline file not found")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes, more than a pipeline file may hold ({MAX_YAML_BYTES:,})")
    try:
        raw = load_yaml(path.read_bytes().decode("utf-8"), str(path))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        raise ConfigError(f"{path}: file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"<root>: expected a mapping of pipeline keys, got {type(raw).__name__}")
    for ov in overrides or []:
        apply_override(raw, ov)
    raw = interpolate(raw)
    return validate(raw), raw
