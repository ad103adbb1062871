"""A tiny model folder for the demo tests: RWKV-UNet-T for the synthetic shapes (4 named classes, grey input,
processor resizing to 64 x 64), random (seeded) or trained for a few steps on the synthetic generator's images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation, RWKVUNetImageProcessor
from rwkvunet.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_image

SIZE = 64


def make_model_folder(path: Path, train_steps: int = 0, seed: int = 0) -> Path:
    """Save the model (and its processor) with ``save_pretrained`` into ``path``; ``train_steps`` > 0 trains it
    first (AdamW, cross-entropy, batches of 8 synthetic images), enough for overlays that follow the shapes."""
    torch.manual_seed(seed)
    names = dict(enumerate(SYNTHETIC_CLASSES))
    config = RWKVUNetConfig(variant="t", num_labels=len(names), in_channels=1, id2label=names,
                            label2id={n: i for i, n in names.items()})
    model = RWKVUNetForSemanticSegmentation(config)
    if train_steps:
        _train(model, train_steps, seed)
    model.eval().save_pretrained(path)
    RWKVUNetImageProcessor(size={"height": SIZE, "width": SIZE}, num_channels=1).save_pretrained(path)
    return Path(path)


def _train(model, steps: int, seed: int, batch: int = 8) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        pairs = [make_synthetic_image(seed * 100_000 + step * batch + i, SIZE) for i in range(batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.float32) / 255.0)[:, None]
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
        loss = F.cross_entropy(model(pixel_values=x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
