"""Reusable pieces of the fine-tuning script: options, schedule, resumable state, checkpoints, plots, card."""
from .arguments import TrainArguments, build_parser, parse_arguments
from .checkpoints import CheckpointManager
from .schedule import cosine_schedule
from .state import EpochSampler, SeededSamples, TrainState

__all__ = [
    "TrainArguments", "build_parser", "parse_arguments", "CheckpointManager", "cosine_schedule",
    "EpochSampler", "SeededSamples", "TrainState",
]
