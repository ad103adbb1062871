"""Fine-tuning and evaluation: the loop (:mod:`.finetune`), scoring a saved model (:mod:`.evaluate`), comparing
models (:mod:`.compare`), and their pieces: options and shipped configs, schedule, resumable state, checkpoints,
plots, model card."""
from .arguments import TrainArguments, build_parser, parse_arguments
from .checkpoints import CheckpointManager
from .schedule import cosine_schedule
from .state import EpochSampler, SeededSamples, TrainState

__all__ = [
    "TrainArguments", "build_parser", "parse_arguments", "CheckpointManager", "cosine_schedule",
    "EpochSampler", "SeededSamples", "TrainState",
]
