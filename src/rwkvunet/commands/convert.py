"""``rwkvunet convert``: the authors' released checkpoints -> a transformers segmenter folder or a timm encoder folder.

    rwkvunet convert synapse_b.pth out/ --variant b --num-labels 9 --in-channels 1
    rwkvunet convert enc_b.pth out/ --variant b --encoder
    rwkvunet convert synapse_b.pth out/ --hub-config hub_configs/rwkvunet-b-synapse --with-code --publish

A segmenter folder loads with ``AutoModelForSemanticSegmentation.from_pretrained`` and
``AutoImageProcessor.from_pretrained``; an encoder folder with ``timm.create_model("local-dir:out/")``
(or ``"hf-hub:<repo>"`` once uploaded).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import EXIT_OK, EXIT_PARTIAL, UserError, print_error, run_main, whole_number
from ..file_modes import give_default_mode
from ..hub import HUB_ORG, load_weights_file, quiet_transformers
from ..inference_io import check_output_folder
from ..models.encoder import ENCODER_VARIANTS, MODEL_PREFIX, _unwrap, released_variants

PROG = "rwkvunet convert"

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class ConversionError(UserError):
    """A checkpoint that does not fit the requested conversion (the message says why and what to do)."""


# --- reading ----------------------------------------------------------------------------------------------
def load_checkpoint(path, prefix: str = "") -> Dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a torch file (read with ``weights_only=True``), unwrapped from
    ``state_dict`` / ``model`` / EMA containers, without a ``module.`` (DataParallel) prefix and, when
    ``prefix`` is given, restricted to the keys under it (with the prefix removed)."""
    path = Path(path)
    state = load_weights_file(path)  # an empty, truncated or unsafe file is a UserError naming it
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state_dict")
    state = _unwrap(state)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ConversionError(f"no key of {path} starts with the prefix {prefix!r}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        raise ConversionError(f"{path} holds no tensors at the top level (keys: {sorted(state)[:8]})")
    return tensors


# --- what is it? ------------------------------------------------------------------------------------------
def _encoder_part(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if any(k.startswith("encoder.") for k in state):
        return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return state


def encoder_shape(state: Dict[str, torch.Tensor]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(stage dims, stage depths) of the encoder in an authors' (or this package's) checkpoint."""
    enc = _encoder_part(state)
    dims, depths = [], []
    for i in range(1, 5):
        proj = enc.get(f"stage{i}.0.proj.conv.weight", enc.get(f"stage{i}.0.proj.weight"))
        dims.append(int(proj.shape[0]) if proj is not None else 0)
        blocks = {int(m.group(1)) for k in enc for m in [re.match(rf"stage{i}\.(\d+)\.", k)] if m}
        depths.append(max(blocks) + 1 if blocks else 0)
    return tuple(dims), tuple(depths)


def _matching_variant(state: Dict[str, torch.Tensor], names) -> Optional[str]:
    dims, depths = encoder_shape(state)
    for name in names:
        arch = ENCODER_VARIANTS[name]
        if tuple(arch["dims"]) == dims and tuple(arch["depths"]) == depths:
            return name
    return None


def infer_variant(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """The released variant (``released_variants()``: the authors' t, s, b) the key shapes match, or None."""
    return _matching_variant(state, released_variants())


def is_segmenter(state: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("final_conv.", "decoder1.", "segmentation_head.", "decoder.0.")) for k in state)


def check_variant(state: Dict[str, torch.Tensor], variant: str, src) -> None:
    found = infer_variant(state)
    if found == variant:
        return
    dims, depths = encoder_shape(state)
    if found is None:
        released = released_variants()
        other = _matching_variant(state, [v for v in ENCODER_VARIANTS if v not in released])
        if other is not None:
            raise ConversionError(f"{src} has the shapes of {MODEL_PREFIX}{other} (stage dims {dims}, depths "
                                  f"{depths}), a variant the authors released no checkpoints for; convert reads "
                                  f"the authors' {', '.join(released)} checkpoints only, load this one with "
                                  f"timm.create_model('{MODEL_PREFIX}{other}', pretrained=True, "
                                  "pretrained_cfg_overlay=dict(file=...))")
        raise ConversionError(f"{src} does not look like an RWKV-UNet checkpoint of any variant (stage dims "
                              f"{dims}, depths {depths}; "
                              + "; ".join(f"{v.upper()} has dims {tuple(ENCODER_VARIANTS[v]['dims'])}"
                                          for v in released) + ")" + _prefix_hint(state))
    raise ConversionError(f"{src} looks like an RWKV-UNet-{found.upper()} checkpoint (stage dims {dims}, depths "
                          f"{depths}), not {variant.upper()}; convert it with --variant {found}")


def _prefix_hint(state: Dict[str, torch.Tensor]) -> str:
    """``; pass --prefix P`` when the weights sit under one prefix that hides them (a wrapper's ``module.``,
    ``model.``, a training framework's ``sd.``), else ''."""
    firsts: Dict[str, int] = {}
    for key in state:
        head, dot, _ = key.partition(".")
        if dot:
            firsts[head] = firsts.get(head, 0) + 1
    for head, count in sorted(firsts.items(), key=lambda item: -item[1]):
        inner = {k[len(head) + 1:]: v for k, v in state.items() if k.startswith(head + ".")}
        if encoder_shape(inner)[0] != encoder_shape(state)[0] and any(encoder_shape(inner)[0]):
            return f"; {count} of its {len(state)} keys start with '{head}.', pass --prefix {head}."
    return ""


def _head_rows(state: Dict[str, torch.Tensor]) -> Optional[int]:
    for key in ("final_conv.weight", "segmentation_head.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def shape_mismatches(state: Dict[str, torch.Tensor], model) -> List[Tuple[str, tuple, tuple]]:
    """``(key, checkpoint shape, model shape)`` for every tensor both hold with different shapes."""
    own = model.state_dict()
    return sorted((k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape))


def _describe_mismatches(mismatches) -> str:
    key, got, want = mismatches[0]
    return f"{len(mismatches)} tensor(s) differ in shape (e.g. {key}: {got} in the checkpoint, {want} in the model)"


# --- segmenter ------------------------------------------------------------------------------------------
def convert_segmenter(state, *, variant: str, num_labels: Optional[int] = None, in_channels: Optional[int] = None,
                      config_overrides: Optional[dict] = None, src="checkpoint", labels_from: str = "--num-labels"):
    """An :class:`RWKVUNetForSemanticSegmentation` (eval mode) holding the weights of an authors' segmenter;
    ``labels_from`` names the option that set ``num_labels``, for the message when the head disagrees."""
    from ..models.rwkv_unet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation
    from ..models.rwkv_unet.conversion import convert_authors_state_dict

    if not is_segmenter(state):
        hint = _prefix_hint(state)
        if hint:  # a segmenter under a prefix was called an encoder checkpoint
            raise ConversionError(f"{src} has no decoder or head at the top level of its keys{hint}")
        raise ConversionError(f"{src} has no decoder or head: it looks like an encoder checkpoint; convert it "
                              "with --encoder")
    check_variant(state, variant, src)
    rows = _head_rows(state)
    if num_labels is None:
        num_labels = rows
    elif rows is not None and rows != num_labels:
        raise ConversionError(f"{src} predicts {rows} classes, not the {num_labels} of {labels_from}; "
                              f"{_labels_fix(labels_from, rows)}")
    first = _encoder_part(state).get("stage0.0.conv.conv.weight", _encoder_part(state).get("stem.conv.conv.weight"))
    if in_channels is None:
        in_channels = int(first.shape[1]) if first is not None else 3
    overrides = dict(config_overrides or {})
    for key in ("variant", "encoder_name", "num_labels", "in_channels"):
        overrides.pop(key, None)
    config = RWKVUNetConfig(variant=variant, num_labels=num_labels, in_channels=in_channels, **overrides)
    model = RWKVUNetForSemanticSegmentation(config)
    converted, _ = convert_authors_state_dict(state, model)
    mismatches = shape_mismatches(converted, model)
    if mismatches:
        raise ConversionError(f"{src} does not fit RWKV-UNet-{variant.upper()} with {num_labels} labels and "
                              f"{in_channels} input channels: {_describe_mismatches(mismatches)}; check --variant, "
                              "--num-labels and --in-channels, or that the checkpoint is the authors' RWKV-UNet")
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ConversionError(f"{src} does not fit RWKV-UNet-{variant.upper()} with {num_labels} labels and "
                              f"{in_channels} input channels: missing {missing[:6]}{'...' if len(missing) > 6 else ''}"
                              f", unexpected {unexpected[:6]}")
    return model.eval()


def _labels_fix(labels_from: str, rows: int) -> str:
    if labels_from == "--id2label":
        return f"give {rows} names to --id2label (background first)"
    if labels_from == "--num-labels":
        return f"convert it with --num-labels {rows}"
    return "pick the hub config that matches the checkpoint"


def default_processor(config):
    """The image processor matching a segmenter config: ImageNet normalisation for RGB models, none for
    1-channel slices (already in [0, 1])."""
    from ..models.rwkv_unet import RWKVUNetImageProcessor

    size = {"height": config.image_size, "width": config.image_size}
    return RWKVUNetImageProcessor(size=size, num_channels=config.in_channels,
                                  do_normalize=config.in_channels == 3)


def _read_hub_config(folder: Path) -> Tuple[dict, Optional[dict]]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    processor_file = folder / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text(encoding="utf-8")) if processor_file.is_file() else None
    return config, processor


def _hub_config_segmenter_kwargs(config: dict) -> dict:
    from ..models.rwkv_unet import RWKVUNetConfig

    reference = RWKVUNetConfig().to_dict()
    keep = {k: v for k, v in config.items() if k in reference and k not in (
        "transformers_version", "architectures", "model_type", "auto_map", "dtype", "torch_dtype")}
    if "id2label" in keep:
        keep["id2label"] = {int(k): v for k, v in keep["id2label"].items()}
        keep["label2id"] = keep.get("label2id") or {v: k for k, v in keep["id2label"].items()}
    return keep


def write_segmenter(args, dst: Path) -> Path:
    from ..models.rwkv_unet import RWKVUNetImageProcessor
    from ..models.rwkv_unet.remote_code import add_code

    state = load_checkpoint(args.src, args.prefix)
    overrides, processor_dict = {}, None
    variant, num_labels, in_channels = args.variant, args.num_labels, args.in_channels
    labels_from = "--num-labels"
    if args.hub_config:
        hub_config, processor_dict = _read_hub_config(Path(args.hub_config))
        overrides = _hub_config_segmenter_kwargs(hub_config)
        labels = hub_config.get("id2label")
        hub_values = {"variant": hub_config.get("variant"), "num_labels": len(labels) if labels else None,
                      "in_channels": hub_config.get("in_channels")}
        for name, value in (("variant", variant), ("num_labels", num_labels), ("in_channels", in_channels)):
            if value is not None and hub_values[name] is not None and value != hub_values[name]:
                raise ConversionError(f"--{name.replace('_', '-')} {value} disagrees with {args.hub_config} "
                                      f"({name}={hub_values[name]})")
        variant = variant or hub_values["variant"]
        if num_labels is None and hub_values["num_labels"] is not None:
            num_labels, labels_from = hub_values["num_labels"], f"the id2label of {args.hub_config}"
        in_channels = in_channels or hub_values["in_channels"]
    if variant is None:
        variant = infer_variant(state)
        if variant is None:
            check_variant(state, "b", args.src)  # raises with the shapes found
    if args.id2label:
        overrides["id2label"] = _parse_labels(args.id2label)
        overrides["label2id"] = {name: i for i, name in overrides["id2label"].items()}
        named = len(overrides["id2label"])
        if num_labels is not None and num_labels != named:
            raise ConversionError(f"--id2label names {named} classes but {labels_from} gives {num_labels}; give "
                                  "one name per class (background first)")
        num_labels, labels_from = named, "--id2label"
    if args.image_size:
        overrides["image_size"] = args.image_size
    model = convert_segmenter(state, variant=variant, num_labels=num_labels, in_channels=in_channels,
                              config_overrides=overrides, src=args.src, labels_from=labels_from)
    if args.dtype != "float32":
        model = model.to(getattr(torch, args.dtype))
    if processor_dict is not None:
        processor_dict = {k: v for k, v in processor_dict.items() if k not in ("image_processor_type", "auto_map")}
        processor = RWKVUNetImageProcessor(**processor_dict)
    else:
        processor = default_processor(model.config)
    if processor.num_channels != model.config.in_channels:
        raise ConversionError(f"the image processor gives {processor.num_channels} channels but the model takes "
                              f"{model.config.in_channels}; fix num_channels in preprocessor_config.json")
    with quiet_transformers():  # no progress bar for one file
        model.save_pretrained(dst)
    processor.save_pretrained(dst)
    if args.with_code:
        add_code(dst)
    return dst


def _parse_labels(text: str) -> Dict[int, str]:
    path = Path(text)
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ConversionError(f"--id2label {path} is not valid JSON ({err}); give a list of names or "
                                  "{id: name}") from err
        data = data.get("id2label", data) if isinstance(data, dict) else data
    else:
        data = [name.strip() for name in text.split(",")]
    try:
        labels = dict(enumerate(data)) if isinstance(data, list) else {int(k): str(v) for k, v in data.items()}
    except (AttributeError, TypeError, ValueError) as err:
        raise ConversionError(f"--id2label {text}: expected names 'a,b,c', a JSON list or {{id: name}}") from err
    if sorted(labels) != list(range(len(labels))) or not all(str(v).strip() for v in labels.values()):
        raise ConversionError(f"--id2label {text}: give one non-empty name for each class 0..N-1")
    names = [str(v).strip() for v in labels.values()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # label2id would keep one of them, and legends would show two classes alike
        raise ConversionError(f"--id2label {text}: names {', '.join(repr(n) for n in twice)} more than one class; "
                              "give each class its own name")
    return labels


# --- encoder --------------------------------------------------------------------------------------------
def convert_encoder(state, *, variant: str, src="checkpoint"):
    """A timm ``rwkvunet_enc_{variant}`` holding the weights of an authors' encoder (ImageNet) checkpoint."""
    import timm

    from ..models.encoder import checkpoint_filter_fn

    if is_segmenter(state):
        state = _encoder_part(state)
    check_variant(state, variant, src)
    head = state.get("head.weight")
    model = timm.create_model(f"rwkvunet_enc_{variant}", pretrained=False,
                              num_classes=int(head.shape[0]) if head is not None else 0)
    filtered = checkpoint_filter_fn(state, model)
    mismatches = shape_mismatches(filtered, model)
    stem = [m for m in mismatches if m[0].startswith("stem.") and m[1][1:2] != m[2][1:2]]
    if stem:
        raise ConversionError(f"{src} takes {stem[0][1][1]}-channel images but timm encoders take RGB "
                              f"({stem[0][2][1]} channels); convert the segmenter without --encoder, or an RGB "
                              "checkpoint")
    if mismatches:
        raise ConversionError(f"{src} does not fit rwkvunet_enc_{variant}: {_describe_mismatches(mismatches)}; "
                              "check --variant and --prefix")
    missing, unexpected = model.load_state_dict(filtered, strict=False)
    if missing or unexpected:
        raise ConversionError(f"{src} does not fit rwkvunet_enc_{variant}: missing {missing[:6]}, unexpected "
                              f"{unexpected[:6]}")
    return model.eval()


def write_encoder(args, dst: Path) -> Path:
    from timm.models import save_for_hf

    state = load_checkpoint(args.src, args.prefix)
    variant = args.variant or infer_variant(state)
    if variant is None:
        check_variant(state, "b", args.src)
    model = convert_encoder(state, variant=variant, src=args.src)
    save_for_hf(model, dst, safe_serialization=True)
    return dst


# --- publishing -----------------------------------------------------------------------------------------
def hub_repo_id(hub_config: Optional[str], explicit: Optional[str] = None) -> str:
    if explicit:
        return explicit
    if not hub_config:
        raise ConversionError("--publish needs a repo id (--publish ORG/NAME) or --hub-config to name it")
    return f"{HUB_ORG}/{Path(hub_config).resolve().name}"


def publish(folder, repo_id: str, private: bool = False) -> str:
    """Upload a converted folder to the Hub (needs network and a token with write access)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ConversionError(f"HF_HUB_OFFLINE is set: {folder} was written but not uploaded to {repo_id}")
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Add converted weights")
    except Exception as err:  # network, authentication, permissions
        raise ConversionError(f"{folder} was written but the upload to {repo_id} failed ({type(err).__name__}: "
                              f"{err}); check the network and log in with `hf auth login`") from err
    return getattr(info, "commit_url", str(info))


def copy_card(hub_config: Optional[str], dst: Path) -> None:
    if hub_config and (Path(hub_config) / "README.md").is_file():
        shutil.copyfile(Path(hub_config) / "README.md", dst / "README.md")


# --- command line ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the authors' checkpoint: .pth/.pt/.bin (read with weights_only=True) or "
                                    ".safetensors; a state_dict, possibly inside 'state_dict' or 'model'")
    parser.add_argument("dst", help="output folder (created; an existing one must be empty unless --overwrite)")
    parser.add_argument("--variant", choices=released_variants(), help="model size; inferred from the "
                        "checkpoint when omitted, and checked against it when given")
    parser.add_argument("--num-labels", type=int, help="classes including background (default: the checkpoint's)")
    parser.add_argument("--in-channels", type=int, help="input channels of the converted model (1 for CT/MRI: the "
                        "first conv is summed over RGB, which equals repeating a grey image; default: the "
                        "checkpoint's)")
    parser.add_argument("--id2label", help="class names: a JSON file (list or {id: name}) or 'a,b,c'")
    parser.add_argument("--image-size", type=whole_number(16, unit=" pixels"),
                        help="training resolution for the config and the image processor (default 224; at least 16)")
    parser.add_argument("--encoder", action="store_true", help="SRC is an ImageNet encoder checkpoint: write a timm "
                        "folder (model.safetensors + config.json) instead of a segmenter")
    parser.add_argument("--with-code", action="store_true", help="also copy the model code into DST (auto_map), so "
                        "it loads with trust_remote_code=True without rwkvunet installed")
    parser.add_argument("--hub-config", help="a hub_configs/<repo> folder: take its config, preprocessor config and "
                        "model card")
    parser.add_argument("--prefix", default="", help="only use the keys starting with this prefix (removed)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the saved weights")
    parser.add_argument("--publish", nargs="?", const="", default=None, metavar="REPO_ID",
                        help=f"upload DST to the Hub (default repo: {HUB_ORG}/<hub-config folder name>)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                        help="write into a DST that is not empty: the files the conversion writes are replaced, "
                             "the others are kept (nothing is deleted)")


def _check_dst(args) -> Path:
    """DST must be a folder that can be written or created, and empty unless --overwrite."""
    dst = Path(args.dst)
    check_output_folder(dst, "DST")
    if dst.is_dir() and any(dst.iterdir()) and not args.overwrite:
        raise UserError(f"{dst} is not empty; choose another folder or pass --overwrite (the files the conversion "
                        "writes are replaced, the others are kept)")
    return dst


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` that does not exist yet (what creating it would add), or None."""
    missing = None
    for folder in [path.absolute(), *path.absolute().parents]:
        if folder.exists():
            break
        missing = folder
    return missing


@contextlib.contextmanager
def _staged(dst: Path, protect: Path) -> Iterator[Path]:
    """A new folder beside DST to convert into; its files move into DST only once everything is written, so a
    failed conversion leaves DST as it was, and nothing already in DST is deleted (save_pretrained removes
    shard-like files of a folder it writes to). An output that would replace ``protect`` (SRC) is refused."""
    created = _first_missing(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
    try:
        yield stage
        _move_into(stage, dst, protect)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created is not None and created.exists() and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created)  # only folders this run made, holding no file
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_into(stage: Path, dst: Path, protect: Path) -> None:
    give_default_mode([stage])  # timm's and transformers' safetensors files are written 0600
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    targets = [dst / p.relative_to(stage) for p in files]
    clash = [t for t in targets if t.exists() and t.resolve() == protect.resolve()]
    if clash:
        raise UserError(f"the conversion would replace its own input {protect} ({clash[0].name} in {dst}); give "
                        "another DST")
    dst.mkdir(parents=True, exist_ok=True)
    for file, target in zip(files, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)


def _convert(args, stage: Path) -> None:
    if args.encoder:
        if args.num_labels or args.in_channels or args.with_code or args.id2label:
            raise ConversionError("--num-labels, --in-channels, --id2label and --with-code apply to segmenters, "
                                  "not to --encoder")
        write_encoder(args, stage)
    else:
        write_segmenter(args, stage)
    copy_card(args.hub_config, stage)


def run(args, prog: str = PROG) -> int:
    if args.private and args.publish is None:  # it was silently ignored
        raise UserError("--private creates the Hub repo of --publish as private, and nothing is published; add "
                        "--publish or drop --private")
    dst = _check_dst(args)
    repo_id = hub_repo_id(args.hub_config, args.publish) if args.publish is not None else None
    if repo_id is not None:  # a name the Hub refuses is said before converting (offline, the folder is kept)
        from ..hub import check_repo_id

        check_repo_id(repo_id, "--publish")
    try:
        with _staged(dst, Path(args.src)) as stage:
            _convert(args, stage)
    except UserError:
        raise
    except ValueError as err:  # an invalid configuration: its message says what to change
        raise UserError(str(err)) from err
    print(f"wrote {dst}")
    if repo_id is not None:
        try:
            print(f"uploaded to {publish(dst, repo_id, private=args.private)}")
        except UserError as err:
            print_error(prog, str(err))
            return EXIT_PARTIAL  # written, not uploaded
    return EXIT_OK


def main(argv=None, prog: str = PROG) -> int:
    """``prog`` names the command in messages (scripts that run a conversion pass their own name)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    return run_main(prog, lambda: run(args, prog), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
