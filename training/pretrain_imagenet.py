#!/usr/bin/env python
"""Pretrain an RWKV-UNet encoder on an ImageFolder (ImageNet-1k) with Accelerate and timm's helpers.

    accelerate launch training/pretrain_imagenet.py --config training/pretrain_imagenet.yaml \
        --data-dir /data/imagenet --model rwkvunet_enc_t

The recipe is the authors' (training/pretrain_imagenet.yaml, shared with timm's train.py): timm's data
pipeline (create_dataset + create_transform with RandAugment), optimizer (create_optimizer_v2), scheduler
(create_scheduler_v2, updated per step) and EMA (ModelEmaV3). ``--data-dir`` holds ``train/<class>/*.jpg`` and
optionally ``validation/`` (or ``val/``). Checkpoints are written atomically and ``--resume`` continues from the
latest; at the end the EMA weights are exported in timm's Hub format (``model.safetensors`` + ``config.json``)
to ``<output>/export``, loadable with ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=".../model.safetensors"))`` or pushed to the Hub as they are.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy CPUs: do not let OpenMP threads spin

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import rwkvunet  # noqa: F401,E402  (registers rwkvunet_enc_{t,s,b} with timm)
from rwkvunet.errors import UserError  # noqa: E402
from rwkvunet.file_modes import give_default_mode  # noqa: E402
from rwkvunet.training.checkpoints import CheckpointManager  # noqa: E402
from rwkvunet.training.run_folder import live_process, read_json, write_json  # noqa: E402
from rwkvunet.training.state import TrainState  # noqa: E402

logger = logging.getLogger("pretrain")

#: Options (timm train.py names) and defaults: the authors' recipe for RWKV-UNet-B.
DEFAULTS = dict(
    data_dir=None, model="rwkvunet_enc_b", num_classes=None, img_size=224, batch_size=128, epochs=300,
    max_steps=None, opt="adamw", lr=3e-3, weight_decay=0.05, sched="cosine", warmup_epochs=20, warmup_lr=5e-7,
    min_lr=5e-7, cooldown_epochs=0, aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, train_interpolation="random",
    reprob=0.0, smoothing=0.1, drop_path=0.05, model_ema=True, model_ema_decay=0.9998, amp=True, workers=4,
    output="runs/pretrain", seed=42, resume=None, keep_checkpoints=2, num_threads=None,
)
#: Keys of the shared YAML that only timm's train.py uses.
TIMM_ONLY = {"device_modules", "mixup", "cutmix", "mixup_prob", "pin_mem"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML recipe (training/pretrain_imagenet.yaml)")
    for name, default in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction)
        elif name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", help="continue from the latest checkpoint")
        else:
            kind = type(default) if default is not None else (int if name in ("num_classes", "max_steps",
                                                                               "num_threads") else str)
            parser.add_argument(flag, type=kind)
    given = vars(parser.parse_args(argv))
    values = dict(DEFAULTS)
    if "config" in given:
        from rwkvunet.training.arguments import read_yaml

        recipe = read_yaml(given.pop("config"))
        if not isinstance(recipe, dict):
            raise UserError("the --config recipe must hold a mapping of option: value")
        unknown = set(recipe) - set(DEFAULTS) - TIMM_ONLY
        if unknown:
            raise UserError(f"unknown keys in the recipe: {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
        if recipe.get("mixup") or recipe.get("cutmix"):
            raise UserError("this script does not implement mixup/cutmix; use timm's train.py for them")
        values.update({k: v for k, v in recipe.items() if k in DEFAULTS})
    values.update(given)
    if not values["data_dir"]:
        parser.error("--data-dir is required (an ImageFolder root with train/)")
    problem = check_values(values)
    if problem:
        raise UserError(problem)
    return argparse.Namespace(**values)


#: (lowest, highest) allowed for numeric options (None: no bound); a value out of range is a one-line error.
RANGES = dict(
    num_classes=(2, None), img_size=(16, None), batch_size=(1, None), epochs=(1, None), max_steps=(1, None),
    lr=(0, None), weight_decay=(0, None), warmup_epochs=(0, None), warmup_lr=(0, None), min_lr=(0, None),
    cooldown_epochs=(0, None), color_jitter=(0, None), reprob=(0, 1), smoothing=(0, 0.999), drop_path=(0, 0.999),
    model_ema_decay=(0, 1), workers=(0, None), seed=(0, 2 ** 32 - 1), keep_checkpoints=(1, None),
    num_threads=(1, None),
)
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly")


def check_values(values: dict) -> str | None:
    """What is wrong with the merged options (command line over recipe), or None: every mistake is found here,
    before a model is built, instead of failing inside timm or PyTorch."""
    import difflib
    import math as _math

    import timm
    from timm.optim import list_optimizers

    for name, (low, high) in RANGES.items():
        value = values.get(name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not _math.isfinite(value):
            return f"{flag} must be a finite number, got {value!r}"
        if value < low or (high is not None and value > high):
            return f"{flag} must be {f'from {low} to {high}' if high is not None else f'at least {low}'}, got {value}"
    if not timm.is_model(values["model"]):
        close = difflib.get_close_matches(values["model"], timm.list_models("rwkvunet_enc_*") + timm.list_models(),
                                          n=1)
        return (f"--model {values['model']} is not a timm model" + (f" (did you mean {close[0]}?)" if close else "")
                + "; the encoders are " + ", ".join(timm.list_models("rwkvunet_enc_*")))
    if values["opt"].lower() not in list_optimizers():
        close = difflib.get_close_matches(values["opt"].lower(), list_optimizers(), n=1)
        return f"--opt {values['opt']} is not a timm optimizer" + (f" (did you mean {close[0]}?)" if close else "")
    if values["sched"] not in SCHEDULERS:
        return f"--sched must be one of {', '.join(SCHEDULERS)}, got {values['sched']!r}"
    if values["min_lr"] > values["lr"]:  # the schedule would rise to min_lr instead of decaying
        return f"--min-lr {values['min_lr']:g} is above --lr {values['lr']:g}; give a --min-lr at most the lr"
    return None


#: In --output: which process is pretraining into it (status running / finished, host, pid).
RUN_FILE = "pretrain.json"


def check_output(output: Path, resume) -> None:
    """--output must be a folder; one holding an earlier pretraining is continued only with --resume (a new run
    would replace its checkpoints of the same steps and its export), and one a pretraining is still writing not
    at all (both runs would write the same checkpoints)."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder (it is created if missing)")
    pid = live_process(read_json(output / RUN_FILE))
    if pid is not None:
        raise UserError(f"--output {output} is being written by a pretraining that is still running (process {pid} "
                        "on this machine); wait for it to finish, stop it, or give another --output")
    earlier = [p for p in (output / "checkpoints", output / "export") if p.is_dir() and any(p.iterdir())]
    if earlier and not resume:
        raise UserError(f"--output {output} holds an earlier pretraining ({', '.join(p.name for p in earlier)}); "
                        "pass --resume to continue it, or give another --output")


def find_split(root: Path, names) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def make_loader(root: Path, args, training: bool, data_config: dict):
    from timm.data import create_dataset, create_transform

    transform = create_transform(
        data_config["input_size"], is_training=training, auto_augment=args.aa if training else None,
        color_jitter=args.color_jitter, interpolation=args.train_interpolation if training else
        data_config["interpolation"], re_prob=args.reprob, mean=data_config["mean"], std=data_config["std"],
        crop_pct=None if training else data_config["crop_pct"],
    )
    dataset = create_dataset("", root=str(root), is_training=training, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=training,
                                         num_workers=args.workers, drop_last=training and len(dataset) >= args.batch_size,
                                         generator=torch.Generator().manual_seed(args.seed))
    return dataset, loader


def export_for_hub(model, folder: Path, model_name: str) -> Path:
    """timm's Hub format: ``model.safetensors`` and ``config.json`` (architecture + pretrained_cfg)."""
    from timm.models._hub import save_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architecture": model_name, "num_classes": model.num_classes}
    save_for_hf(model, str(folder), model_config=config, safe_serialization=True)
    give_default_mode([folder])  # safetensors writes the weights 0600 (see rwkvunet.file_modes)
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    import timm
    from timm.data import resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, accuracy

    amp = ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16") \
        if args.amp and torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=amp)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    set_seed(args.seed)
    root, output = Path(args.data_dir), Path(args.output)
    train_dir = find_split(root, ("train",))
    if train_dir is None:
        raise UserError(f"{root} has no train/ folder; expected an ImageFolder: train/<class>/<image>")
    check_output(output, args.resume)
    val_dir = find_split(root, ("validation", "val"))

    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise UserError(f"{train_dir} holds {len(classes)} class folder(s); an ImageFolder has one folder of images "
                        "per class, at least two: train/<class>/<image>")
    if args.num_classes is not None and args.num_classes < len(classes):
        raise UserError(f"--num-classes {args.num_classes} is fewer than the {len(classes)} class folders in "
                        f"{train_dir}; leave it out to use their number")
    num_classes = args.num_classes or len(classes)
    model = timm.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path)
    data_config = resolve_data_config({"input_size": (3, args.img_size, args.img_size)}, model=model)
    _, train_loader = make_loader(train_dir, args, True, data_config)
    val_loader = make_loader(val_dir, args, False, data_config)[1] if val_dir else None
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, device=accelerator.device) if args.model_ema else None
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    updates_per_epoch = len(train_loader)
    epochs = math.ceil(args.max_steps / updates_per_epoch) if args.max_steps else args.epochs
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
    loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else torch.nn.CrossEntropyLoss()
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    checkpoints = CheckpointManager(output / "checkpoints", keep_last=args.keep_checkpoints)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / RUN_FILE, dict(status="running", host=socket.gethostname(), pid=os.getpid()))
    if args.resume:
        ckpt = checkpoints.latest() if args.resume == "latest" else Path(args.resume)
        if ckpt is None:
            raise UserError(f"no checkpoint in {checkpoints.directory} to resume from; run without --resume to "
                            "start, or give the --output of the run to continue")
        accelerator.load_state(str(ckpt))
        logger.info("resumed from %s (epoch %d, step %d)", ckpt, state.epoch, state.step)

    total = args.max_steps or epochs * updates_per_epoch
    bar = tqdm(total=total, initial=state.step, desc="pretraining", disable=not accelerator.is_main_process)
    start = time.time()
    while state.step < total:
        model.train()
        loader = train_loader
        if state.batch_in_epoch:
            from accelerate import skip_first_batches

            loader = skip_first_batches(train_loader, state.batch_in_epoch)
        loader.set_epoch(state.epoch)
        for images, targets in loader:
            with accelerator.autocast():
                loss = loss_fn(model(images), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch_in_epoch += 1
            scheduler.step_update(num_updates=state.step)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=state.step)
            value = accelerator.reduce(loss.detach().float(), "mean").item()
            state.train_loss.append([state.step, state.epoch, value, optimizer.param_groups[0]["lr"]])
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if state.step >= total:
                break
        state.epoch += 1
        state.batch_in_epoch = 0
        scheduler.step(state.epoch)
        if val_loader is not None:
            top1 = validate(ema.module if ema is not None else model, val_loader, accelerator, accuracy)
            state.validation.append([state.step, state.epoch, top1])
            if accelerator.is_main_process:
                tqdm.write(f"epoch {state.epoch}: top-1 {top1:.2f}" + (" (EMA)" if ema is not None else ""))
        checkpoints.save(accelerator, state.step)
    bar.close()

    if accelerator.is_main_process:
        final = ema.module if ema is not None else accelerator.unwrap_model(model)
        folder = export_for_hub(final, output / "export", args.model)
        logger.info("exported %s weights to %s in %.1f min", "EMA" if ema is not None else "final", folder,
                    (time.time() - start) / 60)
        write_json(output / RUN_FILE, dict(status="finished", host=socket.gethostname(), pid=os.getpid(),
                                           steps=state.step))
    accelerator.wait_for_everyone()
    return 0


@torch.no_grad()
def validate(model, loader, accelerator, accuracy) -> float:
    model.eval()
    correct, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for images, targets in loader:
        logits = model(images.to(accelerator.device))
        logits, targets = accelerator.gather_for_metrics((logits, targets))
        correct += accuracy(logits, targets, topk=(1,))[0] * targets.shape[0] / 100
        count += targets.shape[0]
    return float(100 * correct / count.clamp_min(1))


if __name__ == "__main__":
    from rwkvunet.errors import run_main

    sys.exit(run_main("pretrain_imagenet.py", main))  # one-line errors; RWKVUNET_DEBUG=1 for tracebacks
