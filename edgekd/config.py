"""Pipeline configuration: YAML loading, ${ENV:-default} interpolation, --set overrides,
and pydantic validation whose errors name the YAML key path (`stages[1].prune.target_macs`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, EdgekdError, InputError, did_you_mean
from .schema import TIMM, PipelineConfig


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


def _keys_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the config block at `loc` (the parent of an unknown key)."""
    from .distill import LOSSES

    for i, part in enumerate(loc):
        if _is_term_tag(loc, i):
            model = LOSSES.get(part).Term
            continue
        if isinstance(part, int):
            continue
        if model is None:
            return []
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        ann = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model else []


def _is_term_tag(loc: tuple, i: int) -> bool:
    """pydantic puts the chosen union member in an error's path (`objective[0].kd.temperature`):
    for an objective term that member is its loss name, right after the list index."""
    from .distill import LOSSES

    return i > 0 and isinstance(loc[i - 1], int) and loc[i] in LOSSES


def _without_term_tags(loc: tuple) -> tuple:
    """The path as the YAML spells it: the term's loss is already there, under `loss`."""
    return tuple(p for i, p in enumerate(loc) if not _is_term_tag(loc, i))


def format_validation_error(err: ValidationError, prefix: tuple = (), model: type[BaseModel] | None = None) -> str:
    from .distill import LOSSES

    lines = []
    for e in err.errors():
        loc = prefix + _without_term_tags(tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(e["loc"][-1], _keys_at(model, tuple(e["loc"])[:-1]))
        elif e["type"] == "union_tag_invalid":  # an objective term naming a loss that does not exist
            tag = e["ctx"]["tag"]
            loc, msg = loc + (e["ctx"]["discriminator"].strip("'"),), \
                f"unknown loss {tag!r}{did_you_mean(tag, LOSSES.names())}; known: {', '.join(LOSSES.names())}"
        elif e["type"] == "union_tag_not_found":
            loc, msg = loc + (e["ctx"]["discriminator"].strip("'"),), f"required key is missing (one of {', '.join(LOSSES.names())})"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] not in ("missing", "extra_forbidden", "union_tag_invalid") and "input" in e and not isinstance(e["input"], (dict, list)):
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
    cfg._validated = validated
    check_order(validated)
    _check_teachers(cfg, validated)
    check_inputs(cfg)
    _check_prunable(cfg, validated)
    return cfg


def _check_prunable(cfg: PipelineConfig, validated: dict[int, tuple[str, BaseModel]]) -> None:
    """A prune stage's student traced as that stage will trace it (random weights, a second for a
    mobile model): a student torch-pruning cannot follow, or a `prune.ignore` entry that names no
    module, is known here, not after the stages before it have trained."""
    prunes = [(i, scfg) for i, (name, scfg) in validated.items() if name == "prune"]
    if not prunes:
        return
    from .models import build
    from .pruning import check_prunable

    student = cfg.student
    classes = student.num_classes or cfg.data.num_classes or 10
    spec = {"arch": student.arch, "num_classes": classes, "cifar_stem": student.cifar_stem, "width_mult": student.width_mult}
    if student.checkpoint:
        if student.trust_pickle:
            return  # a pickled model is what it is, whatever student.arch says: not unpickled here (the stage checks)
        from .safeload import open_checkpoint

        kind, obj = open_checkpoint(Path(student.checkpoint).expanduser(), "student.checkpoint", False, "", mmap=True)
        if kind == "torchscript":
            return
        if isinstance(obj, dict) and obj.get("edgekd_format"):  # its own spec wins over student.arch (models.load_model)
            spec, classes = dict(obj["spec"]), obj["spec"]["num_classes"]
    model = build(spec)
    for i, scfg in prunes:
        try:
            check_prunable(model, cfg.data.image_size, scfg.ignore, classes, scfg.importance)
        except EdgekdError as e:
            if str(e).startswith("prune.ignore:"):
                raise ConfigError(f"stages[{i}].{e}") from None
            raise ConfigError(f"stages[{i}].prune: student.arch {spec['arch']}: {e}; pick another student "
                              "architecture or leave the prune stage out") from None


def check_order(validated: dict[int, tuple[str, BaseModel]]) -> None:
    """Stages in an order whose outputs hold (Stage.step): a prune after quantize would leave int8
    files of the unpruned student, which export then verifies against the pruned one and stops; a
    benchmark before anything is written measures nothing."""
    from .stages import STAGES

    seen: list[tuple[int, str, Any]] = []
    for i, (name, _) in validated.items():
        cls = STAGES.get(name)
        if cls.step is None:
            continue
        for j, jname, jcls in seen:
            if jcls.step > cls.step:
                raise ConfigError(f"stages[{i}].{name}: must come before stages[{j}].{jname} ({name} {cls.does}; "
                                  f"{jname} {jcls.does})")
        if cls.step == 3 and not any(c.step in (1, 2) for _, _, c in seen):
            raise ConfigError(f"stages[{i}].{name}: no stage before it writes model files ({name} {cls.does}; add an "
                              "export stage before it)")
        seen.append((i, name, cls))


def _check_teachers(cfg: PipelineConfig, validated: dict[int, tuple[str, BaseModel]]) -> None:
    """Every distillation term names a teacher the pipeline has (or there is exactly one)."""
    configs = cfg.teacher_configs()
    teachers = list(configs)
    without = []
    trained = cfg.trained_teachers()  # assistant -> the (last) stage that trains it
    for i, (name, scfg) in validated.items():
        if hasattr(scfg, "trains") and trained[scfg.trains()] != i:
            j = trained[scfg.trains()]
            raise ConfigError(f"stages[{j}].{validated[j][0]}.name: {scfg.trains()!r} is trained by stages[{i}] already "
                              "(one assistant stage per teacher)")
    for i, (name, scfg) in validated.items():
        for key, teacher, features, val_acc in getattr(scfg, "teachers_used", lambda: [])():
            where = f"stages[{i}].{name}.{key}"
            if val_acc and not cfg.data.val_split:
                raise ConfigError(f"{where}_weights: val_acc weighs each teacher by its top-1 on the validation split, "
                                  "but data.val_split is 0 (set e.g. data.val_split: 0.1, or give the weights)")
            chosen = configs.get(teacher if teacher is not None else (teachers[0] if len(teachers) == 1 else ""))
            if features and chosen is not None and (chosen.checkpoint or "").lower().endswith(".onnx"):
                raise ConfigError(f"{where}: this term reads the teacher's features, but an ONNX teacher gives logits "
                                  "only (use a PyTorch checkpoint of it, or a logit loss)")
            if teacher is None and not teachers:
                without.append(name)
            elif teacher is None and len(teachers) > 1:
                raise ConfigError(f"{where}: the pipeline has {len(teachers)} teachers ({', '.join(teachers)}); name "
                                  "one per term (objective: [{loss: kd, teacher: NAME}, ...])")
            elif teacher is not None and teacher not in teachers:
                raise ConfigError(f"{where}: unknown teacher {teacher!r}{did_you_mean(teacher, teachers)}; the pipeline's "
                                  f"teachers: {', '.join(teachers) or 'none'}")
            elif teacher in trained and trained[teacher] > i:
                raise ConfigError(f"{where}: teacher {teacher!r} is trained by stages[{trained[teacher]}], "
                                  "which runs later (move that assistant stage before this one)")
    if without:
        raise ConfigError(f"teacher: required key is missing (stages {', '.join(dict.fromkeys(without))} use a distillation loss)")


def check_inputs(cfg: PipelineConfig) -> None:
    """What can be known wrong before anything runs: an architecture that does not exist, a
    data source or checkpoint file that is not there (so a typo fails in a second with exit 2,
    not after the data has been decoded)."""
    src = cfg.data.source
    if src.lower() not in ("cifar10", "cifar100") and not _exists(Path(src).expanduser()):
        parent = Path(src).expanduser().parent
        near = did_you_mean(Path(src).name, [p.name for p in parent.iterdir()]) if _is_dir(parent) else ""
        raise ConfigError(f"data.source: {src} does not exist{near} (expected cifar10, cifar100, an ImageFolder "
                          "directory or a tar or zip archive of one)")
    if _is_dir(Path(src).expanduser()):  # a folder's layout costs a listing to check (an archive's, reading it)
        from .data import check_layout

        check_layout(Path(src).expanduser(), cfg.data)
    roles = {"student": cfg.student, **{cfg.teacher_path(n): m for n, m in cfg.teacher_configs().items()}}
    for role, m in roles.items():
        onnx = bool(m.checkpoint) and m.checkpoint.lower().endswith(".onnx")
        if not onnx and m.arch.startswith(TIMM):
            _check_timm(role, m)
        elif not onnx:
            known = _architectures()
            if m.arch not in known:
                raise ConfigError(f"{role}.arch: unknown architecture {m.arch!r}{did_you_mean(m.arch, known)} "
                                  "(expected a torchvision classification model, see torchvision.models.list_models())")
            _check_options(role, m)
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


def _check_timm(role: str, m) -> None:
    from .models import timm_models

    try:
        known = timm_models()
    except InputError as e:
        raise ConfigError(f"{role}.arch: {e}") from None
    name = m.arch[len(TIMM):]
    if name not in known:
        raise ConfigError(f"{role}.arch: unknown architecture {m.arch!r}{did_you_mean(name, known)} (expected "
                          "timm/<a timm model>, see timm.list_models())")
    if m.width_mult is not None:
        raise ConfigError(f"{role}.width_mult: only for torchvision models; pick a timm variant of that width "
                          "(e.g. timm/mobilenetv3_small_050)")


def _check_options(role: str, m) -> None:
    """Build a torchvision model on the meta device (no memory, no weights, milliseconds), so an
    option its architecture does not take (width_mult on a RegNet, cifar_stem on a ShuffleNet)
    fails here, named by its key, not once the data have been decoded. An architecture whose
    initialiser computes with tensors cannot be built there; where an option is set, it is built
    for real (random weights: a fraction of a second for a mobile model)."""
    import torch

    from .models import build

    spec = {"arch": m.arch, "num_classes": 2, "cifar_stem": m.cifar_stem, "width_mult": m.width_mult}
    try:
        try:
            with torch.device("meta"):
                build(spec)
        except NotImplementedError:  # "Cannot copy out of meta tensor"
            if m.cifar_stem or m.width_mult is not None:
                build(spec)
    except InputError as e:
        if "cifar_stem" in str(e):
            raise ConfigError(f"{role}.cifar_stem: {e}") from None
        if m.width_mult is not None:
            raise ConfigError(f"{role}.width_mult: {m.arch} takes no width_mult (torchvision's mobilenet_v2 and "
                              f"mobilenet_v3_* do); leave it out or pick a narrower variant of {m.arch}") from None
        raise ConfigError(f"{role}.arch: {e}") from None


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
    raw = _unshared(raw)
    for ov in overrides or []:
        apply_override(raw, ov)
    raw = interpolate(raw)
    return validate(raw), raw


def _unshared(tree: Any) -> Any:
    """`tree` with every mapping and list its own object: a YAML alias (`- distill: *recipe`) loads
    as the anchor's very object, so an override of one path (--set stages[0].distill.lr=...) would
    change the other place too. copy.deepcopy keeps such sharing; this does not."""
    if isinstance(tree, dict):
        return {k: _unshared(v) for k, v in tree.items()}
    return [_unshared(v) for v in tree] if isinstance(tree, list) else tree
