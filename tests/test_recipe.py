"""The from-scratch training recipe: Vision-RWKV initialisation, residual zero-init, parameter groups without
weight decay, deep supervision; none of them changes what a saved model computes."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation
from rwkvunet.layers import ChannelMix, IRBlock, SpatialMix
from rwkvunet.training.optim import build_optimizer, parameter_groups


def _model(**kwargs):
    torch.manual_seed(0)
    return RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=1, **kwargs))


def test_vrwkv_init_ranges():
    """Decay spans -5..3 over the channels, steeper with depth; bonus log(0.3) +- 0.5; mixes (i/C)^(1-l/L)."""
    model = _model()
    mixers = [m for m in model.encoder.modules() if isinstance(m, SpatialMix)]
    assert [(m.layer_id, m.num_layers) for m in mixers] == [(i, 4) for i in range(4)]  # T: 2 + 2 mixing blocks
    for m in mixers:
        decay, first = m.spatial_decay.detach(), m.spatial_first.detach()
        C = decay.numel()
        assert decay[0] == pytest.approx(-5) and decay[-1] == pytest.approx(3)
        assert bool((decay[1:] > decay[:-1]).all())  # monotone over the channels
        assert set(torch.round(first - math.log(0.3), decimals=4).tolist()) == {-0.5, 0.0, 0.5}
        exponent = 1 - m.layer_id / m.num_layers
        k = m.spatial_mix_k.detach().flatten()
        torch.testing.assert_close(k, (torch.arange(C) / C) ** exponent)
        torch.testing.assert_close(m.spatial_mix_r.detach().flatten(), (torch.arange(C) / C) ** (0.5 * exponent))
        torch.testing.assert_close(m.spatial_mix_v.detach().flatten(),
                                   (torch.arange(C) / C) ** exponent + 0.3 * m.layer_id / (m.num_layers - 1))
    # deeper layers: the decay curve bends further towards -5 (more channels look far)
    assert mixers[-1].spatial_decay[len(mixers[-1].spatial_decay) // 2] < mixers[0].spatial_decay[
        len(mixers[0].spatial_decay) // 2]
    ccm = model.ccm.channel
    C = ccm.spatial_mix_k.shape[-1]
    torch.testing.assert_close(ccm.spatial_mix_k.detach().flatten(), torch.arange(C) / C)


def test_uniform_init_is_the_former_start():
    model = _model(rwkv_init="uniform")
    for m in model.modules():
        if isinstance(m, SpatialMix):
            assert bool((m.spatial_decay == 0).all() and (m.spatial_first == 0).all())
            assert bool((m.spatial_mix_v == 0.5).all())
        if isinstance(m, ChannelMix):
            assert bool((m.spatial_mix_k == 0.5).all())
    with pytest.raises(ValueError, match="rwkv_init"):
        RWKVUNetConfig(variant="t", rwkv_init="fancy")


def test_layer_reset_parameters_matches_the_model_init():
    model = _model()
    mixer = [m for m in model.encoder.modules() if isinstance(m, SpatialMix)][2]
    expected = {n: p.detach().clone() for n, p in mixer.named_parameters() if n.startswith("spatial_")}
    mixer.reset_parameters("uniform")
    assert bool((mixer.spatial_decay == 0).all())
    mixer.reset_parameters("vrwkv")
    for name, value in expected.items():
        torch.testing.assert_close(getattr(mixer, name).detach(), value)


def test_zero_init_residual_starts_blocks_as_identities():
    model = _model(zero_init_residual=True).eval()
    blocks = [b for b in model.encoder.modules() if isinstance(b, IRBlock) and b.residual]
    assert blocks
    x = torch.randn(1, blocks[0].proj.out_channels, 8, 8)
    for block in blocks:
        assert bool((block.proj.weight == 0).all())
        if block.mix_norm is not None:
            assert bool((block.mix_norm.weight == 0).all())
        x = torch.randn(1, block.proj.out_channels, 8, 8).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(block(x), x)
    # the blocks without a shortcut keep their ordinary start
    first = model.encoder.stage1[0]
    assert not first.residual and first.proj.weight.abs().sum() > 0


def test_parameter_groups_hold_exactly_the_intended_parameters():
    model = _model(deep_supervision=True)
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    # independent reference: conv kernels and linear weights decay; everything 1-D and the mixes do not
    for name, param in model.named_parameters():
        is_kernel = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), (torch.nn.Conv2d, torch.nn.Linear)) \
            and name.endswith(".weight")
        assert (name in decayed) == is_kernel, name
    assert any(n.endswith("spatial_mix_k") for n in kept) and any(n.endswith("spatial_decay") for n in kept)
    assert any(n.endswith("key_norm.weight") for n in kept) and any(".bn." in n or "norm" in n for n in kept)
    optimizer = build_optimizer(model, 1e-3, 0.05)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_deep_supervision_leaves_the_logits_unchanged():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 48, 40)
    labels = (torch.rand(2, 48, 40) > 0.5).long()
    plain, supervised = _model(), _model(deep_supervision=True)
    missing = supervised.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("aux_heads.") for k in missing)
    assert not any(k.startswith("aux_heads.") for k in plain.state_dict())  # off: no extra weights
    for mode in ("eval", "train"):
        getattr(plain, mode)(), getattr(supervised, mode)()
        torch.manual_seed(2)
        a = plain(pixel_values=x, labels=labels)
        torch.manual_seed(2)
        b = supervised(pixel_values=x, labels=labels)
        torch.testing.assert_close(a.logits, b.logits)
        if mode == "eval":  # the auxiliary losses count only in training
            torch.testing.assert_close(a.loss, b.loss)
        else:
            assert b.loss > a.loss
    b.loss.backward()
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in supervised.aux_heads)


def test_head_init():
    """small: std initializer_range; xavier: uniform in +-sqrt(6 / (fan_in + fan_out)), the aux heads too."""
    small = _model(head_init="small").segmentation_head.weight.detach()
    assert small.std() < 0.03
    model = _model(head_init="xavier", deep_supervision=True)
    for head in [model.segmentation_head, *model.aux_heads]:
        w = head.weight.detach()
        bound = math.sqrt(6 / (w.shape[1] + w.shape[0]))
        assert w.abs().max() <= bound and w.std() > 0.5 * bound / math.sqrt(3)
        assert bool((head.bias == 0).all())
    with pytest.raises(ValueError, match="head_init"):
        RWKVUNetConfig(variant="t", head_init="zeros")


def test_head_bias_starts_a_binary_head_at_the_foreground_prior():
    """The config's default 0 leaves a model built directly as it was; finetune.py's -2 reaches a one-logit head
    and its auxiliary heads and the smp reference's head (a property of the data and the loss, so both models get
    it), while heads of several labels start at 0."""
    from rwkvunet.training.arguments import parse_arguments
    from rwkvunet.training.inputs import build_model

    assert RWKVUNetConfig(variant="t").head_bias == 0.0
    assert _model().segmentation_head.bias.tolist() == [0.0]
    model = _model(head_bias=-2.0, deep_supervision=True)
    for head in [model.segmentation_head, *model.aux_heads]:
        assert head.bias.tolist() == [-2.0]
    torch.manual_seed(0)
    multi = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=3, head_bias=-2.0))
    assert multi.segmentation_head.bias.tolist() == [0.0, 0.0, 0.0]

    args = parse_arguments([])
    assert args.head_bias == -2.0
    built = build_model(args, 1, 3, ["foreground"])
    assert built.segmentation_head.bias.tolist() == [-2.0] and built.config.head_bias == -2.0
    assert torch.sigmoid(torch.tensor(args.head_bias)) == pytest.approx(0.119, abs=1e-3)
    flat = build_model(parse_arguments(["--head-bias", "0"]), 1, 3, ["foreground"])
    assert flat.segmentation_head.bias.tolist() == [0.0]
    if importlib.util.find_spec("segmentation_models_pytorch"):  # the reference (smp's own start: bias 0)
        reference = build_model(parse_arguments(["--model", "smp-unet-r34"]), 1, 3, ["foreground"])
        assert reference.unet.segmentation_head[0].bias.tolist() == [-2.0]
        assert reference.config.head_bias == -2.0
        own = build_model(parse_arguments(["--model", "smp-unet-r34", "--head-bias", "0"]), 1, 3, ["foreground"])
        assert own.unet.segmentation_head[0].bias.tolist() == [0.0]
        three = build_model(parse_arguments(["--model", "smp-unet-r34"]), 3, 3, ["a", "b", "c"])
        assert three.unet.segmentation_head[0].bias.tolist() == [0.0, 0.0, 0.0]  # smp's start


def test_a_run_recorded_before_head_bias_existed_resumes_at_the_bias_it_started_with(tmp_path):
    """Such a run started its head at 0: resuming it with the new default is refused by name, and with
    --head-bias 0 it continues (the weights come from the checkpoint either way)."""
    from rwkvunet.errors import UserError
    from rwkvunet.training.arguments import parse_arguments
    from rwkvunet.training.run_folder import _check_same_settings

    recorded = {k: v for k, v in parse_arguments([]).to_dict().items() if k != "head_bias"}
    with pytest.raises(UserError, match=r"--head-bias 0.0 -> -2.0"):
        _check_same_settings({"settings": recorded}, parse_arguments([]).to_dict(), 1, tmp_path)
    _check_same_settings({"settings": recorded}, parse_arguments(["--head-bias", "0"]).to_dict(), 1, tmp_path)
    with pytest.raises(UserError, match=r"--head-bias -2.0 -> 0.0"):  # a recorded value counts as recorded
        _check_same_settings({"settings": parse_arguments([]).to_dict()},
                             parse_arguments(["--head-bias", "0"]).to_dict(), 1, tmp_path)


def _reference_scale(name: str, rwkv: float, decoder: float) -> float:
    """Independent of optim.py: the RWKV mixes by their attribute names, the decoder side by the module tree."""
    if name.rsplit(".", 1)[-1] in ("spatial_decay", "spatial_first", "spatial_mix_k", "spatial_mix_v",
                                   "spatial_mix_r"):
        return rwkv
    return 1.0 if name.split(".")[0] == "encoder" else decoder


def test_lr_scales_split_the_groups_and_keep_the_weight_decay():
    model = _model()
    plain = build_optimizer(model, 1e-3, 0.05)
    assert [(g["lr"], g["weight_decay"]) for g in plain.param_groups] == [(1e-3, 0.05), (1e-3, 0.0)]
    optimizer = build_optimizer(model, 1e-3, 0.05, rwkv_lr_scale=3.0, decoder_lr_scale=0.5)
    assert len(optimizer.param_groups) == 5  # encoder / decoder kernels, encoder / decoder / RWKV-mix no-decay
    seen = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen[id(p)] = (group["lr"], group["weight_decay"])
    names = dict(model.named_parameters())
    assert len(seen) == len(names)
    decayed = {id(p) for p in plain.param_groups[0]["params"]}
    for name, p in names.items():
        lr, wd = seen[id(p)]
        assert lr == pytest.approx(1e-3 * _reference_scale(name, 3.0, 0.5)), name
        assert wd == (0.05 if id(p) in decayed else 0.0), name
    # the CCM bridge's channel mix holds RWKV mixes outside the encoder: they follow the RWKV multiplier
    assert seen[id(model.ccm.channel.spatial_mix_k)][0] == pytest.approx(3e-3)
    assert seen[id(model.segmentation_head.weight)][0] == pytest.approx(5e-4)


def test_lr_scales_follow_the_schedule():
    from rwkvunet.training import cosine_schedule

    model = _model()
    optimizer = build_optimizer(model, 2e-3, 0.0, rwkv_lr_scale=4.0, decoder_lr_scale=2.0)
    scheduler = cosine_schedule(optimizer, total_steps=10, warmup_steps=2)
    for _ in range(2):  # end of the warm-up: every group at its own peak
        optimizer.step()
        scheduler.step()
    peaks = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    assert peaks == pytest.approx([2e-3, 4e-3, 8e-3])


def test_default_lr_is_the_models_own():
    from rwkvunet.training.arguments import DEFAULT_LR, parse_arguments

    assert DEFAULT_LR["rwkvunet"] != DEFAULT_LR["smp-unet-r34"]
    rwkv, smp = parse_arguments([]), parse_arguments(["--model", "smp-unet-r34"])
    assert rwkv.peak_lr == DEFAULT_LR["rwkvunet"] and smp.peak_lr == DEFAULT_LR["smp-unet-r34"]
    assert rwkv.to_dict()["lr"] == DEFAULT_LR["rwkvunet"]  # the run folder records the lr it trained at
    # a copy for another model takes that model's own lr, not the first model's
    assert dataclasses.replace(rwkv, model="smp-unet-r34").peak_lr == DEFAULT_LR["smp-unet-r34"]
    # --lr overrides both alike; "none" asks for the model's own
    assert parse_arguments(["--model", "smp-unet-r34", "--lr", "5e-4"]).peak_lr == 5e-4
    given = parse_arguments(["--lr", "5e-4"])
    assert dataclasses.replace(given, model="smp-unet-r34").peak_lr == 5e-4 and given.to_dict()["lr"] == 5e-4
    assert parse_arguments(["--model", "smp-unet-r34", "--lr", "none"]).peak_lr == DEFAULT_LR["smp-unet-r34"]


def test_lr_null_in_a_config_is_the_models_own(tmp_path):
    from rwkvunet.training.arguments import DEFAULT_LR, parse_arguments

    config = tmp_path / "c.yaml"
    config.write_text("lr: null\nmodel: smp-unet-r34\n")
    assert parse_arguments(["--config", str(config)]).peak_lr == DEFAULT_LR["smp-unet-r34"]
    config.write_text("lr: 2.0e-4\n")
    assert parse_arguments(["--config", str(config)]).peak_lr == 2e-4
    assert parse_arguments(["--config", str(config), "--lr", "none"]).peak_lr == DEFAULT_LR["rwkvunet"]


def test_finetune_passes_the_lr_scales_to_the_optimizer(tmp_path, monkeypatch):
    from rwkvunet.training import finetune
    from rwkvunet.training.arguments import DEFAULT_LR

    built = []

    def spy(*args, **kwargs):
        built.append(build_optimizer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(finetune, "build_optimizer", spy)
    tiny = ["--img-size", "32", "--batch-size", "4", "--synthetic-size", "32", "--synthetic-train", "4",
            "--synthetic-eval", "2", "--overlay-samples", "0", "--eval-every", "0", "--num-threads", "1",
            "--max-steps", "1", "--warmup-steps", "0", "--rwkv-lr-scale", "3",
            "--decoder-lr-scale", "2", "--output-dir", str(tmp_path / "run")]
    assert finetune.train(tiny) == 0  # in this process as it is (main would keep freed memory for reuse)
    groups = built[0].param_groups
    assert sorted({g["lr_scale"] for g in groups}) == [1.0, 2.0, 3.0]
    assert all(g["initial_lr"] == pytest.approx(DEFAULT_LR["rwkvunet"] * g["lr_scale"]) for g in groups)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["rwkv_lr_scale"] == 3.0


def test_runs_from_pretrained_weights_default_to_the_fine_tuning_lr(tmp_path):
    """The from-scratch lr (2e-2) would wipe out pretrained weights: fine-tuning runs default to FINETUNE_LR,
    and an explicit --lr still wins."""
    from rwkvunet.training.arguments import DEFAULT_LR, FINETUNE_LR, parse_arguments

    assert FINETUNE_LR < DEFAULT_LR["rwkvunet"] / 5
    weights = tmp_path / "encoder.safetensors"
    weights.write_bytes(b"")
    assert parse_arguments(["--encoder-pretrained", str(weights)]).peak_lr == FINETUNE_LR
    assert parse_arguments(["--pretrained", str(tmp_path)]).peak_lr == FINETUNE_LR
    assert parse_arguments(["--pretrained", str(tmp_path), "--lr", "5e-4"]).peak_lr == 5e-4
    assert parse_arguments([]).peak_lr == DEFAULT_LR["rwkvunet"]


def test_rwkv_lr_scale_defaults_to_the_scratch_multiplier_and_to_one_from_pretrained_weights(tmp_path):
    """From scratch the RWKV decay, bonus and mixes train at SCRATCH_RWKV_LR_SCALE x the lr; from pretrained weights
    every parameter shares one lr (the paper's fine-tuning); a given --rwkv-lr-scale wins, and the run records the
    multiplier it trained at."""
    from rwkvunet.training.arguments import SCRATCH_RWKV_LR_SCALE, parse_arguments

    assert 0 < SCRATCH_RWKV_LR_SCALE < 1
    scratch = parse_arguments([])
    assert scratch.rwkv_lr_scale is None and scratch.rwkv_lr_multiplier == SCRATCH_RWKV_LR_SCALE
    assert scratch.to_dict()["rwkv_lr_scale"] == SCRATCH_RWKV_LR_SCALE
    weights = tmp_path / "encoder.safetensors"
    weights.write_bytes(b"")
    assert parse_arguments(["--encoder-pretrained", str(weights)]).rwkv_lr_multiplier == 1.0
    assert parse_arguments(["--pretrained", str(tmp_path)]).rwkv_lr_multiplier == 1.0
    assert parse_arguments(["--pretrained", str(tmp_path), "--rwkv-lr-scale", "0.5"]).rwkv_lr_multiplier == 0.5
    assert parse_arguments(["--rwkv-lr-scale", "1"]).to_dict()["rwkv_lr_scale"] == 1.0
    assert parse_arguments(["--rwkv-lr-scale", "none"]).rwkv_lr_multiplier == SCRATCH_RWKV_LR_SCALE
    assert parse_arguments(["--model", "smp-unet-r34"]).to_dict()["rwkv_lr_scale"] == 1.0  # no RWKV parameters


def test_a_default_scratch_run_trains_the_rwkv_mixes_at_the_scratch_multiplier(tmp_path, monkeypatch):
    from rwkvunet.training import finetune
    from rwkvunet.training.arguments import DEFAULT_LR, SCRATCH_RWKV_LR_SCALE

    built = []
    monkeypatch.setattr(finetune, "build_optimizer",
                        lambda *a, **k: built.append(build_optimizer(*a, **k)) or built[-1])
    tiny = ["--img-size", "32", "--batch-size", "4", "--synthetic-size", "32", "--synthetic-train", "4",
            "--synthetic-eval", "2", "--overlay-samples", "0", "--eval-every", "0", "--num-threads", "1",
            "--max-steps", "1", "--warmup-steps", "0", "--output-dir", str(tmp_path / "run")]
    assert finetune.train(tiny) == 0
    peaks = {round(g["initial_lr"], 12) for g in built[0].param_groups}
    assert peaks == {DEFAULT_LR["rwkvunet"], round(DEFAULT_LR["rwkvunet"] * SCRATCH_RWKV_LR_SCALE, 12)}
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["rwkv_lr_scale"] == SCRATCH_RWKV_LR_SCALE
