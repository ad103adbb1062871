"""What a run needs to continue exactly where it stopped.

Accelerate saves the model, optimizer, scheduler and RNG states; :class:`TrainState` adds the loop position
and the history. The data order comes from :class:`EpochSampler` (a permutation fixed by seed and epoch) and
each sample's augmentation from its own generator seeded by (seed, epoch, index) in :class:`SeededSamples`,
so batch ``k`` of epoch ``e`` is the same whether the run was interrupted or not, with any number of
processes or data workers.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class TrainState:
    """Loop position and history; registered with ``accelerator.register_for_checkpointing``."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    micro_step: int = 0  # Accelerate's gradient-accumulation counter
    best_dice: float = -1.0
    best_step: int = -1
    train_loss: list = field(default_factory=list)  # [step, epoch, loss, lr]
    validation: list = field(default_factory=list)  # [step, epoch, mean dice]
    train_seconds: float = 0.0  # training time of the run's earlier pieces (a resumed run adds its own)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle fixed by ``(seed, epoch)``; call :meth:`set_epoch` before iterating."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = int(num_samples), int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return iter(torch.randperm(self.num_samples, generator=gen).tolist())

    def __len__(self) -> int:
        return self.num_samples


class SeededSamples(torch.utils.data.Dataset):
    """Wraps a dataset whose transform draws from torch's global generator: each item is made under its own
    seed ``(seed, epoch, index)`` and the global generator is left as it was."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, self.epoch, int(index)))
            return self.dataset[index]


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    digest = hashlib.blake2b(",".join(str(v) for v in values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
