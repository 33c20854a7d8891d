"""The stage contract: a validated config class and one `run(ctx) -> StageResult` method.

A stage registers itself with `@STAGES.register("name")`; the runner does the rest
(ordering, run directory, resume, reports)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from ..registry import Registry


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)  # headline figures of the stage's output model
    models: dict[str, dict] = field(default_factory=dict)  # per model variant: {"top1":..., "size_bytes":..., ...}
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path (relative to the run dir)
    history: list[dict] = field(default_factory=list)  # training curves
    info: dict[str, Any] = field(default_factory=dict)  # anything else worth reporting
    model_changed: bool = False  # whether ctx.model was replaced or trained

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class Stage(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    # Where the stage stands in a pipeline (config.check_order): a stage changes what every stage of
    # a higher `step` reads, so none may follow one of those; None: anywhere (an assistant trains a
    # teacher). `does` says what it does, for that check's message.
    step: ClassVar[int | None] = None
    does: ClassVar[str] = ""

    def __init__(self, config: BaseModel):
        self.config = config

    @abstractmethod
    def run(self, ctx) -> StageResult:
        """Do the stage's work on `ctx` (the run context) and describe what came out."""


STAGES: Registry[type[Stage]] = Registry("stage")


def register(name: str):
    def deco(cls: type[Stage]) -> type[Stage]:
        cls.name = name
        return STAGES.register(name)(cls)

    return deco
