"""The pipeline's schema: pydantic models of every top-level block, with nothing that loads or
validates a file, so stages and the training loop import them without importing the stage
registry (config.py, which loads and validates pipelines, imports both)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator


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
    """Checked member by member as a tar or zip archive is read, so a bomb stops before it fills the disk."""

    max_bytes: int | None = Field(None, gt=0, description="total unpacked bytes (default: no limit beyond max_ratio and free disk)")
    max_ratio: float = Field(100.0, gt=0, description="unpacked bytes per archive byte, beyond a 64 MiB allowance "
                                                      "(images do not compress; a bomb does, up to ~1000x)")
    max_files: int = Field(2_000_000, gt=0)


class DataConfig(Strict):
    source: str = Field(description="cifar10 | cifar100 | path to an ImageFolder dir | path to a tar or zip archive of one (.tar.gz, .tar.xz, .zip, ...)")
    root: str = Field("~/.cache/edgekd/datasets", description="download folder for torchvision datasets")
    download: bool = False
    train_dir: str | None = Field(None, description="train sub-folder inside the folder/archive (auto: 'train')")
    test_dir: str | None = Field(None, description="test sub-folder inside the folder/archive (auto: 'test' or 'val')")
    image_size: int = Field(32, gt=0, description="the model's input: images are resized (short side) and centre-cropped "
                                                   "to this square when decoded, unless store_size is set")
    store_size: int | None = Field(None, gt=0, description="decode at this short side instead (centre-cropped square, "
                                                           ">= image_size, e.g. 256 for 224): training crops image_size "
                                                           "from the whole stored image, evaluation its centre")
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    num_classes: int | None = Field(None, gt=1, description="expected class count; checked against the data")
    subset: int | None = Field(None, gt=0, description="stratified, seeded subset of the train split")
    test_subset: int | None = Field(None, gt=0, description="stratified, seeded subset of the test split")
    labels: str | None = Field(None, description="a CSV inside the source naming each train image and its class "
                               "(header row; file names relative to train_dir where set, else to the CSV's folder; a "
                               "bare id may leave out .jpg/.jpeg/.png; UTF-8 or cp1252, comma, semicolon or tab "
                               "separated), instead of class folders")
    test_labels: str | None = Field(None, description="the same for the test images (relative to test_dir where set); "
                                    "without it, set test_split")
    label_columns: tuple[str, str] | None = Field(None, description="[file column, class column] of the label files "
                                                  "(auto: the first of file_name, filename, file, path, image, "
                                                  "image_id, id, and of label, class, category, target)")
    class_names: str | None = Field(None, description="a text file giving the classes readable names, one "
                                    "'<class> <name>' a line (the class as its folder or label-file value, then a tab or "
                                    "spaces: Imagenette's classes.txt, ImageNet's LOC_synset_mapping.txt), inside the "
                                    "source like labels, else a path; the names go into the exported files' metadata "
                                    "(edgekd.classes), the report and classify.py's output")
    test_split: float = Field(0.0, ge=0.0, lt=1.0, description="for a source with no test folder (one folder of class "
                              "folders, or train/ alone): this fraction of its images, stratified and the same for "
                              "every run and seed, is held out as the test split")
    val_split: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of train held out for validation")
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    augment: Literal["crop_flip", "flip", "none"] = "crop_flip"
    sampling: Literal["uniform", "balanced"] = Field(
        "uniform", description="how a training pass draws its images: uniform = each once, shuffled; balanced = every "
                               "class equally often (images drawn with replacement, weighted by one over their class's "
                               "size), for a train split whose classes differ a lot in size")
    crop: Literal["auto", "pad", "resized"] = Field(
        "auto", description="crop of crop_flip: pad = 4-pixel reflect-padded random crop (small images), resized = "
                            "random-resized crop (35-100 % of the area, aspect 3/4-4/3, resized back); auto: resized "
                            "from 64 px up")
    skip_bad_images: bool = False
    max_image_pixels: int = Field(64_000_000, gt=0, description="an image with more pixels is a bad image (decompression bombs)")
    archive: ArchiveLimits = Field(default_factory=ArchiveLimits, description="what an archive may unpack to")
    cache_dir: str | None = Field(None, description="decoded-tensor cache (default $EDGEKD_CACHE or ~/.cache/edgekd)")

    @model_validator(mode="after")
    def _one_test_split(self):
        if self.test_split and (self.test_dir or self.test_labels):
            raise ValueError(f"test_split holds the test images out of train, {'test_labels' if self.test_labels else 'test_dir'}"
                             " names them: set one")
        if self.labels and not (self.test_labels or self.test_split):
            raise ValueError("labels: name the test images too, with test_labels (a CSV like labels) or test_split "
                             "(e.g. 0.2, held out of the labelled images)")
        if (self.test_labels or self.label_columns) and not self.labels:
            raise ValueError("test_labels / label_columns go with labels (the train images' CSV)")
        return self

    @model_validator(mode="after")
    def _store_holds_the_input(self):
        if self.store_size is not None and self.store_size < self.image_size:
            raise ValueError(f"store_size ({self.store_size}) must be at least image_size ({self.image_size}): "
                             "crops of image_size are taken from the stored images")
        return self


TIMM = "timm/"  # arch prefix of a timm model


class ModelConfig(Strict):
    arch: str = Field(description="torchvision classification architecture (resnet50, mobilenet_v2, ...) or "
                                  "timm/<name> for a timm model (pip install 'edgekd[timm]')")
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
    teachers: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")], ModelConfig] | None = Field(
        None, min_length=1, description="several named teachers (instead of teacher:), e.g. {r50: {...}, r18: {...}}; "
                                        "objective terms name theirs, the first is the report's reference")
    student: ModelConfig
    stages: list[dict[str, Any]] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_teacher_key(self):
        if self.teacher is not None and self.teachers is not None:
            raise ValueError("set teacher (one) or teachers (several by name), not both")
        return self

    def teacher_configs(self) -> dict[str, ModelConfig]:
        """Every teacher by name; a lone `teacher:` is named 'teacher'."""
        return {"teacher": self.teacher} if self.teacher is not None else dict(self.teachers or {})

    def teacher_path(self, name: str) -> str:
        """The YAML key path of a teacher, for messages: `teacher` or `teachers.<name>`."""
        return "teacher" if self.teacher is not None else f"teachers.{name}"

    def primary_teacher(self) -> str | None:
        return next(iter(self.teacher_configs()), None)

    def trained_teachers(self) -> dict[str, int]:
        """Teachers an `assistant` stage trains in the run -> that stage's index."""
        return {s.trains(): i for i, (_, s) in enumerate(self.stage_entries()) if hasattr(s, "trains")}

    def stage_entries(self) -> list[tuple[str, BaseModel]]:
        """(stage type, validated stage config) in pipeline order."""
        return [self._validated[i] for i in range(len(self.stages))]

    _validated: dict[int, tuple[str, BaseModel]] = {}
