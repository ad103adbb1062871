"""Hugging Face Hub names used by the project (one place to change the organisation), and loading models and
weights files from folders or the Hub with a one-line message for every file a user can get wrong."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import UserError, near_miss_folder

HUB_ORG = "rwkv-unet"
KERNEL_REPO_ID = f"{HUB_ORG}/bi-wkv"
KERNEL_VERSION = 1


#: Where the authors release their checkpoints (ImageNet encoders, Synapse and ACDC segmenters).
AUTHORS_URL = "https://github.com/juntaoJianggavin/RWKV-UNet"
#: The authors publish no licence for their weights, so none is claimed: timm's ``license`` says "unknown"
#: and the Hub cards say ``license: other`` / ``license_name: unknown`` / ``license_link: AUTHORS_URL``.
WEIGHTS_LICENSE = "unknown"


def encoder_repo_id(variant: str, tag: str = "in1k") -> str:
    """Hub repo of an ImageNet-pretrained encoder, e.g. ``rwkv-unet/rwkvunet_enc_b.in1k``."""
    return f"{HUB_ORG}/rwkvunet_enc_{variant}.{tag}"


def segmenter_repo_id(variant: str, dataset: str) -> str:
    """Hub repo of a segmenter trained by the authors, e.g. ``rwkv-unet/rwkvunet-b-synapse``."""
    return f"{HUB_ORG}/rwkvunet-{variant}-{dataset}"


def where_weights_are(encoder: bool) -> str:
    """Where RWKV-UNet weights can be had, for messages about weights that cannot be found."""
    hub = (f"the {HUB_ORG}/* Hub repos (made from hub_configs/ with training/publish_hub.py) must be online or in "
           "the Hub cache (HF_HUB_CACHE) for loading by name")
    if encoder:
        return (f"{hub}; otherwise take the authors' ImageNet checkpoint from {AUTHORS_URL} and load it with "
                "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=CKPT)), or convert it "
                "with `rwkvunet convert CKPT OUT --encoder` and use timm.create_model('local-dir:OUT', "
                "pretrained=True)")
    return (f"{hub}; otherwise take the authors' checkpoint from {AUTHORS_URL}, convert it with `rwkvunet "
            "convert CKPT OUT --hub-config hub_configs/<repo>` and load the folder OUT")


def _is_ours(repo_id: str) -> bool:
    return str(repo_id).startswith(f"{HUB_ORG}/")


def _hub_reason(err: BaseException) -> str:
    """Why a Hub file could not be had, in words (offline and not cached, no such repo or file, no network)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
    )

    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        state = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return f"not in the Hub cache ({constants.HF_HUB_CACHE}) and {state}"
    if isinstance(err, RepositoryNotFoundError):
        return "no such repository on the Hub (or it is private)"
    if isinstance(err, EntryNotFoundError):
        return "the repository has no such file"
    return _first_line(err)


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached from this machine at all, or None. Only a host name that does not resolve
    (an offline or air-gapped machine) counts, and only without a proxy (which resolves names itself): there,
    huggingface_hub retries every file for about 25 s before it falls back to its cache, so callers read the
    cache at once instead (``local_files_only``)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # offline already: the cache is read at once
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror:
        return f"the Hub ({host}) cannot be reached from this machine: its name does not resolve"
    except OSError:
        return None
    return None


@contextlib.contextmanager
def hub_offline_within():
    """Within: huggingface_hub and datasets in offline mode (their caches only), as with HF_HUB_OFFLINE=1. For
    libraries without a ``local_files_only`` argument (``datasets.load_dataset``), where :func:`hub_unreachable`
    says the Hub cannot be reached anyway."""
    from huggingface_hub import constants

    modules = [constants]
    try:
        import datasets.config

        modules.append(datasets.config)
    except ImportError:
        pass
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value


def _hub_errors() -> tuple:
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    return EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, ConnectionError, TimeoutError


def _encoder_repo(model_name: str):
    """The Hub repo timm reads for ``model_name`` ('hf-hub:org/name', or a registered name's pretrained_cfg)."""
    if model_name.startswith("hf-hub:"):
        return model_name[len("hf-hub:"):]
    import timm

    try:
        return timm.models.get_pretrained_cfg(model_name).hf_hub_id
    except (AttributeError, RuntimeError, ValueError, KeyError):
        return None


def _weights_in_folder(folder: Path):
    return next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)


def create_encoder(model_name: str = "rwkvunet_enc_b", pretrained: bool = True, weights=None, **kwargs):
    """``timm.create_model`` for an RWKV-UNet encoder where weights that cannot be found raise a one-line
    :class:`UserError` saying where weights can be had (timm's own error is a Hub traceback).

    ``model_name``: ``"rwkvunet_enc_b"`` (weights from its Hub repo, online or cached), ``"hf-hub:org/name"``
    or ``"local-dir:FOLDER"`` (a folder written by ``rwkvunet convert --encoder``). ``weights``: a weights file
    (the authors' checkpoint or a converted ``model.safetensors``) or a folder holding one, loaded through
    timm's ``pretrained_cfg_overlay=dict(file=...)``. Other arguments go to ``timm.create_model``."""
    import timm

    if weights is not None:
        path = Path(os.path.expanduser(str(weights)))
        if path.is_dir():
            found = _weights_in_folder(path)
            if found is None:
                raise UserError(f"{path} holds no model.safetensors or pytorch_model.bin; give the weights file "
                                f"or a folder written by `rwkvunet convert CKPT OUT --encoder`")
            path = found
        check_safetensors(path) if path.name.endswith(".safetensors") else _check_file(path)
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=str(path.resolve()))
        kwargs["pretrained_cfg_overlay"], pretrained = overlay, True
    if model_name.startswith("local-dir:"):
        folder = Path(os.path.expanduser(model_name[len("local-dir:"):]))
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} has no config.json; give a folder written by `rwkvunet convert CKPT OUT "
                            f"--encoder` (or timm's save_for_hf)")
        if pretrained and _weights_in_folder(folder) is None:
            raise UserError(f"{folder} holds no model.safetensors or pytorch_model.bin; convert the weights into "
                            f"it again; {where_weights_are(encoder=True)}")
    from_hub = pretrained and weights is None and not model_name.startswith("local-dir:")
    offline = hub_unreachable() if from_hub else None
    try:  # where the Hub cannot be reached, its cache at once instead of after ~25 s of retries
        with hub_offline_within() if offline else contextlib.nullcontext():
            return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except _hub_errors() as err:
        repo = _encoder_repo(model_name) or model_name
        reason = f"not in the Hub cache, and {offline}" if offline else _hub_reason(err)
        raise UserError(f"{repo}: {reason}; {where_weights_are(encoder=True)}") from err
    except Exception:
        if weights is not None:
            load_weights_file(path)  # an unreadable or unsafe file raises a UserError naming it
        raise


# --- loading weights and models, with a message for every file a user can get wrong ------------------------
#: The weights files ``save_pretrained`` writes (single file or sharded), in the order transformers prefers.
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
#: from_pretrained arguments that say where to find files (the others configure the model).
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
_REDOWNLOAD = "download, copy or convert it again"


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an error, for one-line messages (or its type when it has no text)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if len(text) < 20:  # e.g. KeyError('101'): the type says more than the text
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the weights file itself")
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): the download or copy did not finish; {_REDOWNLOAD}")


def check_safetensors(path) -> None:
    """Raise :class:`UserError` naming ``path`` when it is not a complete safetensors file (reads the header
    only, so it is cheap on large files)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a complete safetensors file ({_first_line(err)}): it is truncated or "
                        f"damaged; {_REDOWNLOAD}") from err


def _unpickler_detail(err: BaseException) -> str:
    """The line of a weights_only failure that names the offending global."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        after = text.split("WeightsUnpickler error:", 1)[1].strip()
        if after:
            return after.splitlines()[0].split(". ")[0]
    return _first_line(err)


def load_weights_file(path):
    """The contents of one weights file: a dict of tensors from ``.safetensors``, or what a torch file holds,
    read with ``torch.load(weights_only=True)`` so a pickle cannot run code. An empty, truncated or damaged
    file, or a pickle holding more than tensors and containers, raises :class:`UserError` naming the file."""
    import pickle

    import torch

    path = Path(path)
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        check_safetensors(path)
        return load_file(str(path))
    _check_file(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported operand" in str(err):  # not a pickle at all (an image, a text file)
            raise UserError(f"{path} is not a PyTorch weights file ({_unpickler_detail(err)}: its bytes are not a "
                            "pickle); check that this is the checkpoint, or download it again") from err
        if "weights only load failed" in str(err).lower():
            raise UserError(f"{path} holds pickled objects other than tensors ({_unpickler_detail(err)}), so it "
                            "cannot be read with torch.load(weights_only=True); load it where you trust it and "
                            "re-save only its state_dict (torch.save(model.state_dict(), ...)) or as .safetensors"
                            ) from err
        raise _damaged(path, err) from err
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, TypeError) as err:
        raise _damaged(path, err) from err


def _damaged(path: Path, err: BaseException) -> UserError:
    return UserError(f"{path} is not a readable PyTorch weights file ({_first_line(err)}): it is truncated or "
                     f"damaged; {_REDOWNLOAD}")


def check_repo_id(repo_id: str, option: str) -> None:
    """Refuse a repo id the Hub would refuse (huggingface_hub's HFValidationError), naming the option."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{option}: {repo_id!r} is not a valid Hub repo id (NAME or ORG/NAME of letters, digits, "
                        "'-', '_' and '.')") from None


def check_hub_upload(repo_id: str, option: str, later: str = "upload the folder later (hf upload REPO FOLDER)"
                     ) -> None:
    """Refuse an upload that cannot happen before the work it would upload: an id the Hub would refuse, offline
    mode, or no token. ``option`` names the flag in the message (``--push-to-hub``, ``--push``)."""
    from huggingface_hub import constants, get_token

    check_repo_id(repo_id, option)
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{option} needs the Hub, but HF_HUB_OFFLINE is set; unset it, or run without {option} and "
                        f"{later}")
    if get_token() is None:
        raise UserError(f"{option} needs a Hub token with write access; log in with `hf auth login` (or set "
                        "HF_TOKEN) first")


# --- segmentation models ------------------------------------------------------------------------------------
def _looks_like_path(source: str) -> bool:
    """True for names that cannot be a Hub id ('org/name' or 'name')."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def _check_local_folder(source: str) -> None:
    folder = Path(source)
    if folder.is_file() and folder.suffix.lower() == ".onnx":
        raise UserError(f"{source} is an exported ONNX model, which runs in `rwkvunet predict`, `rwkvunet demo` and "
                        "rwkvunet.Segmenter; give the model folder it was exported from")
    if folder.is_file():
        raise UserError(f"{source} is a file; give the model folder that holds it (written by save_pretrained "
                        "or rwkvunet convert) or a Hub id")
    if not (folder / "config.json").is_file():
        raise UserError(f"{source} has no config.json; give a folder written by save_pretrained (or rwkvunet "
                        "convert) or a Hub id")
    if not any((folder / name).is_file() for name in WEIGHTS_FILES):
        raise UserError(f"{source} has a config.json but no weights ({' or '.join(WEIGHTS_FILES[::2])}); copy "
                        "the weights file saved with it into the folder, or save the model again")
    if (folder / "model.safetensors").is_file():
        check_safetensors(folder / "model.safetensors")


def _read_config(source: str, hub_kwargs: dict, offline: str | None = None) -> dict:
    """The model's config.json as a dict (from the folder, or the Hub or its cache); ``offline`` says why only
    the cache was read (see :func:`hub_unreachable`)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source, **hub_kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(source):
            raise UserError(f"cannot read {os.path.join(source, 'config.json')} ({_first_line(err)}); save the "
                            "model again with save_pretrained") from err
        hint = f"; {where_weights_are(encoder=False)}" if _is_ours(source) else ""
        close = near_miss_folder(source)
        hint += f" (or did you mean the folder {close}?)" if close else ""
        if offline:
            from huggingface_hub import constants

            raise UserError(f"{source} is no local folder and not in the Hub cache ({constants.HF_HUB_CACHE}), and "
                            f"{offline}; give a model folder, or download it where there is a network (hf download "
                            f"{source}) and copy the cache here{hint}") from err
        raise UserError(f"{source} is no local folder and cannot be loaded as a Hub id ({_first_line(err)}); "
                        f"check the path or the id, and the network (or HF_HUB_OFFLINE and the cache){hint}"
                        ) from err
    return config


def _check_model_type(source: str, config: dict) -> None:
    from .models.baselines import BASELINE_MODEL_TYPES
    from .models.rwkv_unet.configuration_rwkv_unet import RWKVUNetConfig

    found = config.get("model_type")
    if found != RWKVUNetConfig.model_type and found not in BASELINE_MODEL_TYPES:
        raise UserError(f"{source} holds a {found or 'untyped'!r} model, not RWKV-UNet (model_type "
                        f"{RWKVUNetConfig.model_type!r}); give an RWKV-UNet model folder or Hub id (rwkvunet "
                        "convert turns the authors' checkpoints into one)")


def _weights_paths(source: str, hub_kwargs: dict) -> list:
    """The single-file weights of a folder or of a Hub id's cached snapshot that exist here."""
    if os.path.isdir(source):
        folder = Path(source, hub_kwargs.get("subfolder") or "")
        return [folder / name for name in WEIGHTS_FILES[::2] if (folder / name).is_file()]
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in WEIGHTS_FILES[::2]:
        path = try_to_load_from_cache(source, name, cache_dir=hub_kwargs.get("cache_dir"),
                                      revision=hub_kwargs.get("revision"))
        if isinstance(path, str) and os.path.isfile(path):
            found.append(Path(path))
    return found


def _diagnose_weights(source: str, hub_kwargs: dict, err: BaseException) -> UserError:
    """A message naming the weights file that made from_pretrained fail, or the failure itself."""
    for path in _weights_paths(source, hub_kwargs):
        try:
            load_weights_file(path)
        except UserError as found:
            return found
    if not os.path.isdir(source) and isinstance(err, OSError) and not _weights_paths(source, hub_kwargs):
        hint = f"; {where_weights_are(encoder=False)}" if _is_ours(source) else ""
        return UserError(f"{source}: its config.json is here but its weights are not ({_first_line(err)}); "
                         f"check the network (or HF_HUB_OFFLINE and the cache){hint}")
    return UserError(f"cannot load a segmentation model from {source} ({_first_line(err)}); save the model "
                     "again with save_pretrained, or check the Hub id")


def _example(keys, limit: int = 3) -> str:
    keys = [k if isinstance(k, str) else k[0] for k in keys]
    return ", ".join(sorted(keys)[:limit]) + (", ..." if len(keys) > limit else "")


def _check_loading_info(source: str, info: dict, resizing: bool) -> None:
    """Refuse weights that leave part of the model at random values or do not fit its config."""
    fix = "use the config.json saved with these weights (or the weights saved with this config.json)"
    mismatched = [] if resizing else sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if mismatched:
        key, got, want = mismatched[0]
        raise UserError(f"the weights in {source} do not fit its config.json: {len(mismatched)} tensor(s) differ "
                        f"in shape (e.g. {key}: {tuple(got)} in the weights, {tuple(want)} in the model); {fix}")
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"the weights in {source} lack {len(missing)} of the model's tensors "
                        f"({_example(missing)}), which would keep random values; {fix}")
    unexpected = list(info.get("unexpected_keys") or [])
    if unexpected:
        raise UserError(f"the weights in {source} hold {len(unexpected)} tensor(s) the model does not have "
                        f"({_example(unexpected)}); {fix}")


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' loading report and progress bar: problems are raised here as one-line errors."""
    from transformers.utils import logging

    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def load_segmentation_model(name_or_path, **from_pretrained_kwargs):
    """``AutoModelForSemanticSegmentation.from_pretrained`` for an RWKV-UNet folder (``save_pretrained``) or
    Hub id, where every problem a user can fix (missing path, no config.json, another model type, no weights,
    an empty or truncated weights file, weights that do not fit the config) is a one-line :class:`UserError`.

    With ``ignore_mismatched_sizes=True`` (a new head), tensors of other shapes are re-initialised as usual."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForSemanticSegmentation

    source = os.path.expanduser(str(name_or_path))
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _HUB_KWARGS}
    if os.path.exists(source):
        subfolder = hub_kwargs.get("subfolder")
        _check_local_folder(os.path.join(source, subfolder) if subfolder else source)
    elif _looks_like_path(source):
        close = near_miss_folder(source)
        raise UserError(f"{source} does not exist (and is not a Hub id of the form 'org/name'); "
                        + (f"did you mean {close}?" if close else "check the path"))
    elif "/" in source and near_miss_folder(source):  # a mistyped local path, not sent to the Hub
        raise UserError(f"{source} does not exist (did you mean {near_miss_folder(source)}?)")
    offline = None if os.path.exists(source) or hub_kwargs.get("local_files_only") else hub_unreachable()
    if offline:  # read the Hub cache at once instead of after huggingface_hub's retries (~25 s a file)
        hub_kwargs["local_files_only"] = True
        from_pretrained_kwargs = dict(from_pretrained_kwargs, local_files_only=True)
    _check_model_type(source, _read_config(source, hub_kwargs, offline))
    resizing = bool(from_pretrained_kwargs.get("ignore_mismatched_sizes"))
    # shape mismatches are reported by _check_loading_info, with the shapes, instead of a RuntimeError
    kwargs = dict(from_pretrained_kwargs, output_loading_info=True, ignore_mismatched_sizes=True)
    try:
        with quiet_transformers():
            model, info = AutoModelForSemanticSegmentation.from_pretrained(source, **kwargs)
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, KeyError) as err:
        raise _diagnose_weights(source, hub_kwargs, err) from err
    _check_loading_info(source, info, resizing)
    return model
