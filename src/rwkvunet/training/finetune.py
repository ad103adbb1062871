"""Fine-tune RWKV-UNet with Accelerate.

    rwkvunet finetune                                                         # RWKV-UNet-T, synthetic set, CPU minutes
    accelerate launch -m rwkvunet.finetune --config acdc_b --dataset /data/ACDC
    accelerate launch training/finetune.py --dataset kvasir/ --variant s --epochs 300 --resume     # from a clone

Options override the ``--config`` YAML (a file, or the name of a shipped config such as ``kvasir_seg``), which
overrides the defaults (``--help`` lists them all). The run writes to ``--output-dir``: the model as a
``save_pretrained`` folder with its image processor and a model card, ``metrics.json``, per-class and per-case
CSV of the test split, loss/Dice curves and an overlay grid, and ``checkpoints/`` from which ``--resume``
continues exactly where a killed run stopped.

One folder holds one run: ``--output-dir`` must be new or empty, or hold this run for ``--resume`` (which
continues only the run recorded in its ``run.json``, with the settings it started with). An earlier run's
folder is refused unless ``--overwrite-output-dir``, which removes that run's outputs and nothing else.
Mistakes are one line ``<prog>: error: ...`` and exit status 2 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import os
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

import rwkvunet  # noqa: F401  (registers the model with transformers)
from rwkvunet.data.transforms import SegmentationDataset, TrainTransform, collate_fn
from rwkvunet.errors import PartlyDone, UserError, run_main
from rwkvunet.ops.cpu_memory import keep_freed_cpu_memory
from rwkvunet.evaluation import evaluate, foreground_class_names
from rwkvunet.training import CheckpointManager, EpochSampler, SeededSamples, TrainState, cosine_schedule
from rwkvunet.training.arguments import TrainArguments, parse_arguments
from rwkvunet.training.inputs import (build_image_processor, build_model, check_dataset_path,
                                      check_splits, class_names, count_parameters, infer_in_channels,
                                      load_data, resolve_num_labels)
from rwkvunet.training.model_card import write_model_card
from rwkvunet.training.optim import build_optimizer
from rwkvunet.training.overlays import overlay_rows
from rwkvunet.training.plots import plot_curves, plot_overlays
from rwkvunet.training.processes import main_process_first
from rwkvunet.training.run_folder import checkpoint_metadata, finish_record, plan_run, prepare_folder

logger = logging.getLogger("finetune")


class SimulatedCrash(RuntimeError):
    """Raised by the test hook ``--crash-at-step``: the run stops as if killed after that step."""


def make_train_loader(split, args, num_labels: int, in_channels: int):
    transform = TrainTransform(args.img_size, num_channels=in_channels, num_labels=num_labels)
    samples = SeededSamples(SegmentationDataset(split, transform), seed=args.seed)
    sampler = EpochSampler(len(samples), seed=args.seed)
    loader = torch.utils.data.DataLoader(
        samples, batch_size=args.batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=args.num_workers,
        drop_last=len(samples) >= args.batch_size, generator=torch.Generator().manual_seed(args.seed),
    )
    return loader, sampler, samples


def run_evaluation(model, split, args, accelerator):
    return evaluate(model, split, img_size=args.img_size, batch_size=args.eval_batch_size or args.batch_size,
                    tta=args.tta, accelerator=accelerator, progress=accelerator.is_main_process)


def build_ema(model, decay: float):
    """timm's weight EMA of ``model`` (a copy in eval mode), or None for ``decay`` 0. The i-th update (from 0)
    averages with decay ``min(decay, 1 - (1 + i) ** -3/4)``: the first takes the weights as they are, so a short
    run does not average in its random start."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=3 / 4)


def check_trackers(report_to):
    """The ``--report-to`` trackers, refusing those whose package is missing (Accelerate would skip them)."""
    if not report_to:
        return None
    from accelerate.tracking import get_available_trackers

    wanted = [t.strip() for t in report_to.split(",") if t.strip()]
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = [t for t in wanted if t != "all" and t not in available]
    if missing:
        raise UserError(f"--report-to {','.join(missing)}: not installed (available: {sorted(available) or 'none'}); "
                         f"install it, e.g. pip install {' '.join(missing)}")
    return wanted


def save_pretrained_atomic(model, folder: Path, processor=None) -> None:
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


#: The program name in messages when run as ``python -m rwkvunet.finetune`` (``accelerate launch -m ...``).
PROG = "rwkvunet.finetune"


def main(argv=None, prog: str = PROG) -> int:
    """Run :func:`train` with the errors convention: one line and exit status 2 for a mistake the user can fix."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(prog, lambda: _own_process_and_train(parse_arguments(argv, prog=prog)),
                    debug="--debug" in argv)


def _own_process_and_train(args: TrainArguments) -> int:
    keep_freed_cpu_memory()  # the entry point owns the process: freed CPU activations are kept for reuse
    return train(args)


def train(args: TrainArguments | Sequence[str] | None = None) -> int:
    """Train, test and write the run folder; ``args`` are the settings or the command line that gives them."""
    if not isinstance(args, TrainArguments):
        args = parse_arguments(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir or Path("runs") / args.run_name)
    if args.push_to_hub:
        from rwkvunet.hub import check_hub_upload

        check_hub_upload(hub_repo_id(output_dir, args), "--push-to-hub")
    # processes started by torchrun (`accelerate launch --multi_gpu`) on a machine without GPUs join with gloo
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # every check that can refuse the run comes before the processes wait for each other
    plan = plan_run(output_dir, args.to_dict(), world, resume=args.resume, overwrite=args.overwrite_output_dir)
    check_dataset_path(args.dataset)
    trackers = check_trackers(args.report_to)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))
    cpu = args.cpu or (world > 1 and not torch.accelerator.is_available())
    accelerator = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps, log_with=trackers,
                              project_config=project)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "matplotlib", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    set_seed(args.seed)
    checkpoints = CheckpointManager(output_dir / "checkpoints", keep_last=args.keep_checkpoints)
    resume_from = plan.resume_from

    # --- data and model -----------------------------------------------------------------------------------
    # the main process builds the datasets cache, the others read it
    data, layout = main_process_first(accelerator, lambda: load_data(args))
    check_splits(data, args.dataset, need_validation=args.eval_every > 0)
    num_labels = resolve_num_labels(data, layout, args.num_labels, args.dataset)
    in_channels = args.in_channels or infer_in_channels(data["train"])
    names = class_names(layout, num_labels)
    # weights in the layout their gradients come in (the maps run channels-last), so DDP's gradient buckets
    # match them and need no strided copies
    model = build_model(args, num_labels, in_channels, names).to(memory_format=torch.channels_last)
    processor = build_image_processor(args.img_size, in_channels)
    # the folder is touched only now that the data and the model are known to load
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_folder(plan)
    accelerator.wait_for_everyone()
    logger.info("%d process(es) on %s", accelerator.num_processes, accelerator.device)
    logger.info("%s: %d train rows, splits %s; %d labels, %d channels; %.2f M parameters", args.dataset,
                len(data["train"]), {k: len(v) for k, v in data.items()}, num_labels, in_channels,
                count_parameters(model) / 1e6)

    train_loader, sampler, samples = make_train_loader(data["train"], args, num_labels, in_channels)
    # no decay on norms, biases, RWKV mixes; the lr multipliers split the groups further
    optimizer = build_optimizer(model, args.peak_lr, args.weight_decay, args.rwkv_lr_multiplier,
                                args.decoder_lr_scale)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # stepped once per optimizer step by the loop itself, so the schedule does not depend on the process count
    scheduler = cosine_schedule(optimizer, total_steps, args.warmup_steps, args.min_lr)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    unwrapped = accelerator.unwrap_model(model)
    ema = build_ema(unwrapped, args.ema_decay)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.step = state.micro_step
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, state.epoch,
                    state.batch_in_epoch)
    if args.report_to:
        accelerator.init_trackers(args.run_name, config={k: v for k, v in args.to_dict().items()
                                                         if isinstance(v, (int, float, str, bool))})
    validation = data.get("validation") if args.eval_every else None
    best_dir = output_dir / "best-model"
    # the weights that are validated, tested and saved: the moving average when there is one
    evaluated = ema.module if ema is not None else unwrapped

    def validate():
        result = run_evaluation(evaluated, validation, args, accelerator)
        dice = float(result.mean_dice or 0.0)
        state.validation.append([state.step, state.epoch, dice])
        accelerator.log({"validation/mean_dice": dice}, step=state.step)
        if dice > state.best_dice:
            state.best_dice, state.best_step = dice, state.step
            if accelerator.is_main_process:
                save_pretrained_atomic(evaluated, best_dir)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            tqdm.write(f"epoch {state.epoch} step {state.step}: validation mean Dice {dice:.4f} "
                       f"(best {state.best_dice:.4f} at step {state.best_step})")

    earlier_seconds = state.train_seconds  # the run's pieces before this one (0 for a new run)
    start = time.time()

    def save_checkpoint():
        state.train_seconds = earlier_seconds + time.time() - start
        checkpoints.save(accelerator, state.step, metadata=checkpoint_metadata(plan.record, state.step))

    # --- training -----------------------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    while state.step < total_steps:
        model.train()
        loader = train_loader
        if state.batch_in_epoch:
            from accelerate import skip_first_batches

            loader = skip_first_batches(train_loader, state.batch_in_epoch)
        # Accelerate's loaders pass their own iteration count to the sampler when iterated: make it the epoch
        loader.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch)
        samples.set_epoch(state.epoch)
        loss_sum, micro_batches = 0.0, 0
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
                accelerator.backward(loss)
                loss_sum, micro_batches = loss_sum + loss.detach().float(), micro_batches + 1
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            state.micro_step = accelerator.step
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.update(unwrapped, step=state.step + 1)  # timm counts the updates from 1
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state.step += 1
            loss_value = accelerator.reduce(loss_sum / micro_batches, "mean").item()  # mean over the step's batches
            loss_sum, micro_batches = 0.0, 0
            state.train_loss.append([state.step, state.epoch, loss_value, lr])
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", epoch=state.epoch)
            if state.step % args.log_every == 0 or state.step == total_steps:
                accelerator.log({"train/loss": loss_value, "train/lr": lr, "train/epoch": state.epoch},
                                step=state.step)
            if args.save_every_steps and state.step % args.save_every_steps == 0:
                save_checkpoint()
            if args.crash_at_step is not None and state.step == args.crash_at_step:
                raise SimulatedCrash(f"stopped after step {state.step} (--crash-at-step)")
            if state.step >= total_steps:
                break
        state.epoch += 1
        state.batch_in_epoch = 0
        finished = state.step >= total_steps
        if validation is not None and (state.epoch % args.eval_every == 0 or finished):
            validate()
        save_checkpoint()
    bar.close()
    train_seconds = earlier_seconds + time.time() - start

    # --- test and outputs ---------------------------------------------------------------------------------
    if best_dir.is_dir() and state.best_step >= 0:
        from safetensors.torch import load_file

        unwrapped.load_state_dict(load_file(str(best_dir / "model.safetensors")))
        logger.info("testing the best checkpoint (step %d, validation mean Dice %.4f)", state.best_step,
                    state.best_dice)
    elif ema is not None:  # no validation: the last moving average is the result
        unwrapped.load_state_dict(ema.module.state_dict())
    test = run_evaluation(unwrapped, data["test"], args, accelerator) if "test" in data else None
    overlays = []
    if accelerator.is_main_process and args.overlay_samples > 0:
        source = data["validation"] if "validation" in data else data.get("test")
        if source is not None:
            overlays = overlay_rows(unwrapped, source, img_size=args.img_size, in_channels=in_channels,
                                    limit=args.overlay_samples, tta=args.tta)
    if accelerator.is_main_process:
        write_outputs(output_dir, args, unwrapped, processor, state, test, overlays, num_labels, train_seconds,
                      num_epochs)
        if best_dir.is_dir():
            shutil.rmtree(best_dir)
        finish_record(plan, steps=state.step, train_seconds=round(train_seconds, 1),
                      test_mean_dice=test.mean_dice if test is not None else None)
    accelerator.wait_for_everyone()
    if args.report_to:
        accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        push_to_hub(output_dir, args)
    return 0


def write_outputs(output_dir: Path, args, model, processor, state, test, overlays, num_labels, train_seconds,
                  num_epochs) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    test_dict = test.to_dict() if test is not None else None
    if test is not None:
        test.write_csv(output_dir, prefix="test_")
        print(test.format_table())
    metrics = {
        "test": test_dict,
        "best_validation_mean_dice": state.best_dice if state.best_step >= 0 else None,
        "best_step": state.best_step if state.best_step >= 0 else None,
        "steps": state.step, "epochs": state.epoch, "train_seconds": round(train_seconds, 1),
        "num_parameters": count_parameters(model), "validation_history": state.validation,
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with (output_dir / "train_log.csv").open("w") as f:
        f.write("step,epoch,loss,lr\n")
        f.writelines(f"{s},{e},{loss:.6f},{lr:.6e}\n" for s, e, loss, lr in state.train_loss)
    import yaml

    (output_dir / "training_config.yaml").write_text(yaml.safe_dump(args.to_dict(), sort_keys=False))
    plot_curves(state.train_loss, state.validation, output_dir / "curves.png")
    if overlays:
        names = foreground_class_names(model.config.id2label, num_labels, max(num_labels, 2))
        plot_overlays(overlays, names, output_dir / "overlays.png")
    write_model_card(output_dir, args=args.to_dict(), test=test_dict,
                     validation_best=state.best_dice if state.best_step >= 0 else None, steps=state.step,
                     epochs=state.epoch, num_parameters=count_parameters(model), train_seconds=train_seconds,
                     repo_id=args.hub_model_id)
    logger.info("wrote the model and the results to %s", output_dir)


def hub_repo_id(output_dir: Path, args) -> str:
    return args.hub_model_id or output_dir.resolve().name


def push_to_hub(output_dir: Path, args) -> None:
    from huggingface_hub import HfApi

    repo_id = hub_repo_id(output_dir, args)
    api = HfApi()
    try:
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(folder_path=str(output_dir), repo_id=repo_id,
                          ignore_patterns=["checkpoints/*", "logs/*", "best-model/*", ".tmp-*"],
                          commit_message="Upload fine-tuned RWKV-UNet")
    except Exception as err:  # network, authentication, permissions: the run itself is complete
        reason = " ".join(str(err).split())[:200]
        raise PartlyDone(f"the run is complete in {output_dir}, but the upload to {repo_id} failed "
                         f"({type(err).__name__}: {reason}); upload it later with: hf upload {repo_id} "
                         f"{output_dir}") from err
    logger.info("pushed %s to https://huggingface.co/%s", output_dir, repo_id)


if __name__ == "__main__":
    sys.exit(main())
