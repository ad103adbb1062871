"""Options of fine-tuning (``rwkvunet finetune``, ``training/finetune.py``): defaults, then a YAML config, then the
command line.

Every field of :class:`TrainArguments` is an option ``--field-name`` and a config key ``field_name``
(dashes and underscores are both accepted in configs). The defaults are the no-argument run: RWKV-UNet-T
on the built-in synthetic set for a few minutes on a CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from ..errors import UserError


#: Peak lr of each ``--model`` when ``--lr`` is not given: its own best from scratch at equal budget (3 epochs of
#: DSB2018 and BUSI at 64 x 64, batch 8). RWKV-UNet trains fastest far above a CNN U-Net's 1e-3.
DEFAULT_LR = {"rwkvunet": 2e-2, "smp-unet-r34": 1e-3}  # from scratch: each model's best at equal budget
FINETUNE_LR = 1e-3  # from pretrained weights (--encoder-pretrained, --pretrained): a from-scratch lr would erase them
#: lr multiplier of the RWKV decay, bonus and token-shift mixes when ``--rwkv-lr-scale`` is not given, from scratch:
#: at 2e-2 AdamW may move each of these per-channel parameters by up to 0.02 a step, units over a short run, away
#: from their Vision-RWKV start (measured at 96 x 96: BUSI 0.591 against 0.564 mean test Dice over seeds 0-2,
#: higher on seeds 1 and 2; DSB2018 0.821 against 0.819; at 64 x 64 DSB2018 0.713 against 0.707 and BUSI 0.560
#: against 0.579). Runs from pretrained weights keep one lr for every parameter, as the paper trained.
SCRATCH_RWKV_LR_SCALE = 0.25


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainArguments:
    # data
    dataset: str = _opt("synthetic", "'synthetic' (built-in), a Hub data set id, a save_to_disk folder, an "
                                     "images/ + masks/ folder, or a Synapse / ACDC root")
    image_column: str = _opt("image", "image column of Hub / save_to_disk sets")
    mask_column: str = _opt("mask", "mask column of Hub / save_to_disk sets")
    split_seed: int = _opt(0, "seed of the 8:1:1 split of sets without their own splits (paper: 0, 1, 2)",
                           minimum=0)
    num_labels: Optional[int] = _opt(None, "classes including background (1 = binary with a sigmoid); "
                                           "default: from the data", minimum=1)
    in_channels: Optional[int] = _opt(None, "input channels; default: from the data (1 grey, 3 colour)",
                                     minimum=1)
    cache_dir: Optional[str] = _opt(None, "datasets cache folder")
    synthetic_size: int = _opt(64, "image size of the synthetic set", minimum=1)
    synthetic_train: int = _opt(96, "training images of the synthetic set", minimum=1)
    synthetic_eval: int = _opt(12, "validation and test images (each) of the synthetic set", minimum=1)
    # model
    model: str = _opt("rwkvunet", "segmenter: rwkvunet, or the reference smp-unet-r34 (smp's Unet('resnet34') "
                                  "from scratch, trained and scored by the same loop; needs rwkvunet[baselines])")
    variant: str = _opt("t", "model size: an encoder variant (rwkvunet.ENCODER_VARIANTS: t, s or b, or one "
                             "registered with rwkvunet.register_variant)")
    encoder_pretrained: Optional[str] = _opt(None, "timm encoder weights to start from: a file "
                                                   "(.safetensors / .pth) or a Hub id (hf-hub:org/name)")
    pretrained: Optional[str] = _opt(None, "a saved segmenter to fine-tune: folder or Hub id")
    ce_weight: float = _opt(0.5, "weight of the cross-entropy in the loss", minimum=0)
    dice_weight: float = _opt(0.5, "weight of the Dice loss", minimum=0)
    drop_path_rate: float = _opt(0.15, "stochastic depth of the encoder (0.15: measured best from scratch of 0, "
                                       "0.05 and 0.15, on BUSI)", minimum=0, below=1)
    rwkv_init: str = _opt("vrwkv", "start of the RWKV decay, bonus and token-shift mixes from scratch: vrwkv "
                                   "(Vision-RWKV's per-channel ranges) or uniform (0 and 0.5)")
    zero_init_residual: bool = _opt(False, "start the encoder's residual branches at zero (blocks start as identities)")
    head_init: str = _opt("xavier", "start of the classification head from scratch: xavier (logits of unit "
                                    "scale) or small (near-zero logits)")
    head_bias: float = _opt(-2.0, "start of a binary (one-logit) head's bias from scratch, for every --model: "
                                  "the logit of the foreground probability every pixel starts at (-2: about "
                                  "0.12; 0: one half)")
    deep_supervision: bool = _opt(False, "add a loss on each decoder stage (training only; the logits are unchanged)")
    # schedule
    epochs: int = _opt(20, "training epochs", minimum=1)
    max_steps: Optional[int] = _opt(None, "optimizer steps; overrides --epochs", minimum=1)
    img_size: int = _opt(64, "training and evaluation resolution", minimum=1)
    batch_size: int = _opt(8, "batch size per process", minimum=1)
    eval_batch_size: Optional[int] = _opt(None, "images or slices per forward pass in evaluation (default: "
                                                "--batch-size)", minimum=1)
    lr: Optional[float] = _opt(None, "peak learning rate (AdamW); default: the model's own from-scratch lr "
                                     "(DEFAULT_LR: rwkvunet 2e-2, smp-unet-r34 1e-3), or 1e-3 when starting from "
                                     "pretrained weights (--encoder-pretrained, --pretrained; the paper's configs "
                                     "set theirs)", minimum=0)
    min_lr: float = _opt(0.0, "learning rate at the end of the cosine schedule", minimum=0)
    warmup_steps: int = _opt(50, "linear warm-up steps (50: the ramp the from-scratch lrs were tuned with, a "
                                 "quarter of 3 epochs of a few hundred images)", minimum=0)
    weight_decay: float = _opt(1e-4, "AdamW weight decay", minimum=0)
    rwkv_lr_scale: Optional[float] = _opt(None, "lr multiplier of the RWKV decay, bonus and token-shift mixes; "
                                                "default: 0.25 from scratch (SCRATCH_RWKV_LR_SCALE), 1 from "
                                                "pretrained weights", minimum=0)
    decoder_lr_scale: float = _opt(1.0, "lr multiplier of everything after the encoder (bridge, decoder, head)",
                                   minimum=0)
    ema_decay: float = _opt(0.0, "keep an exponential moving average of the weights (decay warmed up from 0) and validate, test and save it instead of the raw weights; 0: off", minimum=0, below=1)
    max_grad_norm: Optional[float] = _opt(1.0, "gradient clipping norm (0 or none: off)", minimum=0)
    gradient_accumulation_steps: int = _opt(1, "batches per optimizer step", minimum=1)
    mixed_precision: str = _opt("no", "no, fp16 or bf16")
    seed: int = _opt(0, "seed of the model, the data order and the augmentation", minimum=0, below=2 ** 32)
    num_workers: int = _opt(0, "data loader workers", minimum=0)
    cpu: bool = _opt(False, "train on the CPU even when a GPU is available")
    num_threads: Optional[int] = _opt(None, "CPU threads of each process (default: torch's choice)", minimum=1)
    # evaluation and checkpoints
    eval_every: int = _opt(1, "validate every N epochs (0: never; the last epoch's weights are tested)",
                           minimum=0)
    tta: bool = _opt(False, "flip test-time augmentation in validation and test")
    save_every_steps: Optional[int] = _opt(None, "also checkpoint every N optimizer steps (always at epoch ends)",
                                           minimum=1)
    keep_checkpoints: int = _opt(2, "training checkpoints kept", minimum=1)
    resume: Optional[str] = _opt(None, "continue from the latest checkpoint in --output-dir ('latest') or "
                                       "from a given checkpoint folder", nargs="?", const="latest")
    output_dir: Optional[str] = _opt(None, "output folder (default: runs/rwkvunet-<variant>-<dataset>); must be "
                                           "new, empty, or this run's folder with --resume")
    overwrite_output_dir: bool = _opt(False, "start over in an --output-dir that holds an earlier run: removes "
                                             "only that run's files (refused when the folder holds others)")
    overlay_samples: int = _opt(8, "validation samples in the overlay grid", minimum=0)
    # logging and sharing
    report_to: Optional[str] = _opt(None, "Accelerate trackers: tensorboard, wandb, all ... (comma separated)")
    log_every: int = _opt(10, "log the training loss every N steps", minimum=1)
    push_to_hub: bool = _opt(False, "upload the model folder to the Hub at the end")
    hub_model_id: Optional[str] = _opt(None, "Hub repo for --push-to-hub (default: the output folder's name)")
    debug: bool = _opt(False, "show the full traceback of an error (also RWKVUNET_DEBUG=1)")
    crash_at_step: Optional[int] = _opt(None, argparse.SUPPRESS)  # test hook: stop right after this step

    @property
    def run_name(self) -> str:
        data = "synthetic" if self.dataset == "synthetic" else Path(str(self.dataset).rstrip("/")).name
        model = f"rwkvunet-{self.variant}" if self.model == "rwkvunet" else self.model
        return f"{model}-{data}".replace("/", "-")

    @property
    def from_pretrained(self) -> bool:
        """Whether the run starts from pretrained weights (``--encoder-pretrained`` or ``--pretrained``)."""
        return bool(self.encoder_pretrained or self.pretrained)

    @property
    def peak_lr(self) -> Optional[float]:
        """``lr``, or when it is not given ``FINETUNE_LR`` for runs from pretrained weights and otherwise the model's
        own (``DEFAULT_LR``; ``None`` for an unknown model, which
        :func:`check_arguments` refuses). ``lr`` itself stays unset, so a copy for another model (``rwkvunet
        compare``) takes that model's own."""
        if self.lr is not None:
            return self.lr
        if self.from_pretrained:
            return FINETUNE_LR
        return DEFAULT_LR.get(self.model)

    @property
    def rwkv_lr_multiplier(self) -> float:
        """``rwkv_lr_scale``, or when it is not given ``SCRATCH_RWKV_LR_SCALE`` for RWKV-UNet from scratch and 1
        otherwise (runs from pretrained weights; the smp reference, which has no RWKV parameters)."""
        if self.rwkv_lr_scale is not None:
            return self.rwkv_lr_scale
        return SCRATCH_RWKV_LR_SCALE if (self.model == "rwkvunet" and not self.from_pretrained) else 1.0

    def to_dict(self) -> dict:
        """The settings of the run (not how this invocation behaves: debugging, overwriting, test hooks), with the
        lr and RWKV lr multiplier it trains at."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_SETTINGS}
        return {**settings, "lr": self.peak_lr, "rwkv_lr_scale": self.rwkv_lr_multiplier}


#: Options that change how one invocation behaves, not what the run trains.
NOT_SETTINGS = ("crash_at_step", "debug", "overwrite_output_dir")


def _base_type(tp) -> type:
    if get_origin(tp) is Union:
        tp = next(a for a in get_args(tp) if a is not type(None))
    return tp


def _problem(value, kind, minimum=None, below=None):
    """``(number, None)`` for a valid value, ``(None, "must be ...")`` otherwise: NaN, infinities and values out
    of range are refused here, before they fail deep inside the optimizer or the model."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        try:  # "1e3" for an integer option
            number = float(value)
        except (TypeError, ValueError):
            return None, f"must be {'an integer' if kind is int else 'a number'}, got {value}"
    if isinstance(number, float) and not math.isfinite(number):
        return None, f"must be a finite number, got {value}"
    if kind is int and number != int(number):
        return None, f"must be an integer, got {value}"
    number = kind(number)
    if minimum is not None and number < minimum:
        return None, f"must be at least {minimum}, got {value}"
    if below is not None and number >= below:
        return None, f"must be below {below}, got {value}"
    return number, None


def _limits(metadata) -> dict:
    return {k: metadata[k] for k in ("minimum", "below") if k in metadata}


def _argument_type(kind, metadata: dict):
    """An argparse ``type=`` that checks the range, so a bad value is a usage error (exit status 2)."""
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        if kind not in (int, float):
            return kind(text)
        number, problem = _problem(text, kind, **_limits(metadata))
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return number
    parse.__name__ = kind.__name__
    return parse


def build_parser(prog: str = "finetune.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune RWKV-UNet with Accelerate. Options override the --config YAML, which overrides "
                    "the defaults (the defaults train RWKV-UNet-T on a built-in synthetic set).",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """``--config`` and one option per field of :class:`TrainArguments` but those in ``skip`` (``rwkvunet``
    adds its own ``--debug``). Options not given are absent from the namespace, so the config can set them."""
    names = ", ".join(shipped_configs())
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help=f"YAML file of options (keys as the option names), or a shipped config: {names}")
    hints = get_type_hints(TrainArguments)
    for f in dataclasses.fields(TrainArguments):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help")
        if help_text != argparse.SUPPRESS and f.default is not None:
            help_text = f"{help_text} (default: {f.default})"
        kind = _base_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif "nargs" in f.metadata:
            parser.add_argument(flag, nargs=f.metadata["nargs"], const=f.metadata["const"],
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=_argument_type(kind, f.metadata), default=argparse.SUPPRESS,
                                help=help_text, metavar=kind.__name__.upper())


def shipped_configs() -> dict:
    """Name -> YAML file of the configs shipped with the package (the paper's settings per data set)."""
    from importlib.resources import files

    folder = files("rwkvunet.training") / "configs"
    return {Path(p.name).stem: p for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


def find_config(name):
    """``--config``: an existing file, else the shipped config of that name (``kvasir_seg`` or
    ``kvasir_seg.yaml``); anything else is an error naming both."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"--config {name} is a folder; give a YAML file (or the name of a shipped config)")
    shipped = shipped_configs()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if str(path) in (stem, path.name) and stem in shipped:
        return shipped[stem]
    close = difflib.get_close_matches(stem, list(shipped), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"config file {name} not found{hint}; pass --config with an existing YAML file or the name of a "
                    f"shipped config: {', '.join(shipped)}")


class _RepeatedKey(Exception):
    pass


def _unique_key_loader():
    """A yaml.SafeLoader whose mappings refuse a key given twice (the plain loader keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _RepeatedKey(f"{key!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1})")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return Loader


def read_yaml(path):
    """The YAML document in ``path`` (None when empty: ``{}``), where a key given twice in a mapping, a binary
    file or invalid YAML is a one-line :class:`UserError`."""
    import yaml

    try:
        return yaml.load(Path(path).read_text(), Loader=_unique_key_loader()) or {}
    except _RepeatedKey as err:  # YAML kept the last value silently
        raise UserError(f"{path}: {err}; give each option once") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file; pass --config with a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = (f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
                 if mark is not None and getattr(err, "problem", None) else " ".join(str(err).split()))
        raise UserError(f"{path} is not valid YAML ({where}); fix the file") from None


def load_config(path) -> dict:
    """Read a YAML config (a file or a shipped config's name) into option names; unknown keys are an error naming
    them."""
    path = find_config(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option: value, got {type(data).__name__}")
    fields = dataclasses.fields(TrainArguments)
    known = {f.name for f in fields}
    listed = sorted(f.name for f in fields if f.metadata.get("help") is not argparse.SUPPRESS)  # not test hooks
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, listed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{path}: unknown option {key!r}{hint}; valid options: {', '.join(listed)}")
        out[name] = value
    return out


def parse_arguments(argv: Optional[Sequence[str]] = None, prog: str = "finetune.py") -> TrainArguments:
    """Defaults < ``--config`` YAML < command line."""
    return arguments_from(vars(build_parser(prog).parse_args(argv)))


def arguments_from(given: dict) -> TrainArguments:
    """The settings from parsed options (those not given absent) over the ``config`` they name, over the
    defaults, checked."""
    given = dict(given)
    values: dict[str, Any] = {}
    config = given.pop("config", None)
    if config:
        values.update(load_config(config))
    values.update(given)
    fields = {f.name: f for f in dataclasses.fields(TrainArguments)}
    hints = get_type_hints(TrainArguments)
    for name, value in list(values.items()):  # YAML may give "1e-3" as a string, or a value out of range
        kind = _base_type(hints[name])
        if value is not None and kind in (int, float) and not isinstance(value, bool):
            values[name], problem = _problem(value, kind, **_limits(fields[name].metadata))
            if problem:
                raise UserError(f"{name.replace('_', '-')} {problem} (in {config or 'the arguments'})")
    args = TrainArguments(**values)
    check_arguments(args)
    return args


def total_stride(model: str) -> int:
    """How far the model's deepest feature map is downsampled (inputs are padded to a multiple of it)."""
    from ..models.baselines import BASELINES, SMP_SIZE_DIVISOR
    from ..models.rwkv_unet.modeling_rwkv_unet import SIZE_DIVISOR

    return SMP_SIZE_DIVISOR if model in BASELINES else SIZE_DIVISOR


def check_arguments(args: TrainArguments) -> None:
    """Refuse settings that cannot go together or name nothing known (one-line errors)."""
    from ..models.baselines import BASELINES
    from ..models.encoder import ENCODER_VARIANTS

    if args.model not in ("rwkvunet", *BASELINES):
        raise UserError(f"--model must be one of rwkvunet, {', '.join(BASELINES)}, got {args.model!r}")
    if args.model != "rwkvunet" and args.from_pretrained:
        raise UserError(f"--model {args.model} is a reference trained from scratch; --encoder-pretrained and "
                        "--pretrained start RWKV-UNet runs (drop them, or drop --model)")
    if args.variant not in ENCODER_VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(ENCODER_VARIANTS)}, got {args.variant!r}")
    from ..models.rwkv_unet.configuration_rwkv_unet import RWKV_INITS

    if args.rwkv_init not in RWKV_INITS:
        raise UserError(f"--rwkv-init must be one of {', '.join(RWKV_INITS)}, got {args.rwkv_init!r}")
    from ..models.rwkv_unet.configuration_rwkv_unet import HEAD_INITS

    if args.head_init not in HEAD_INITS:
        raise UserError(f"--head-init must be one of {', '.join(HEAD_INITS)}, got {args.head_init!r}")
    if args.mixed_precision not in ("no", "fp16", "bf16"):
        raise UserError(f"--mixed-precision must be no, fp16 or bf16, got {args.mixed_precision!r}")
    if args.encoder_pretrained and args.pretrained:
        raise UserError("give either --encoder-pretrained (a timm encoder) or --pretrained (a whole segmenter), "
                        "not both")
    stride = total_stride(args.model)
    if args.batch_size == 1 and args.img_size <= stride:
        raise UserError(f"at --img-size {args.img_size} the deepest feature map of {args.model} is 1 x 1, and with "
                        f"--batch-size 1 BatchNorm has one value per channel to normalise; use --batch-size 2 or "
                        f"more, or --img-size {stride + 1} or more")
    peak = args.peak_lr
    if peak is not None and args.min_lr > peak:  # the cosine "decay" would have raised the lr to min_lr
        raise UserError(f"--min-lr {args.min_lr:g} is above the peak lr {peak:g}, so the schedule would rise "
                        "instead of decaying; give a --min-lr at most the lr (default 0)")
    if args.hub_model_id and not args.push_to_hub:  # it was silently ignored
        raise UserError(f"--hub-model-id {args.hub_model_id} names the repo of --push-to-hub, and nothing is "
                        "pushed; add --push-to-hub or drop --hub-model-id")
    if args.ce_weight + args.dice_weight <= 0:
        raise UserError("--ce-weight and --dice-weight are both 0, so the loss would be 0 and nothing would train; "
                        "give either a positive weight (defaults: 0.5 and 0.5)")
    if args.resume and args.overwrite_output_dir:
        raise UserError("--resume continues the run in --output-dir and --overwrite-output-dir deletes it; "
                        "give one of them")
