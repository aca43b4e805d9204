"""The stages of a run (``base.Stage``: pretrain, finetune, evaluate, each registered) and
the work around them (VOC AP, export). Imported explicitly: each stage registers itself."""
from benchmark.stages import evaluate, finetune, pretrain  # noqa: F401
from benchmark.stages.base import STAGES, Stage, StageContext, get_stage, register_stage

__all__ = ["STAGES", "Stage", "StageContext", "get_stage", "register_stage"]
