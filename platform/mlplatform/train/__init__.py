"""Sharded mixed-precision training on Ray Train v2 + DeepSpeed ZeRO.

    spec = config.load("jobs/configs/digits.yaml", TrainSpec)
    print(format_plan(plan(spec)))     # what would run, and its memory per ZeRO stage
    result = train(spec)               # preflight, TorchTrainer, checkpoints, final artifact
    model = load_model(result.artifact_dir)
"""

from mlplatform.train.artifact import load_model, read_metadata
from mlplatform.train.plan import Plan, format_plan, plan
from mlplatform.train.preflight import preflight
from mlplatform.train.spec import TrainSpec
from mlplatform.train.trainer import TrainResult, train

__all__ = ["Plan", "TrainResult", "TrainSpec", "format_plan", "load_model", "plan", "preflight", "read_metadata", "train"]
