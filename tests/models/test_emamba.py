"""The EMamba vision family through timm: every registered model, timm's surface, checkpoints."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.optim import create_optimizer_v2

import emamba
import emamba.models.emamba as emamba_mod
from emamba.models import checkpoint_filter_fn

PAPER_MODELS = ["emamba_s", "emamba_b", "emamba_l", "emamba_s_mlp", "emamba_b_mlp", "emamba_l_mlp"]
ALL_MODELS = timm.list_models("emamba_*")
# The paper's parameter counts (token-label head included, 1000 classes), in millions.
PAPER_PARAMS = {"emamba_s": 15.31, "emamba_b": 22.82, "emamba_l": 36.64,
                "emamba_s_mlp": 26.59, "emamba_b_mlp": 40.21, "emamba_l_mlp": 66.76}
SMALL = 32  # smallest valid size (1x1 last-stage grid): keeps the L models fast on 2 cores


def test_registry_lists_every_variant():
    assert set(PAPER_MODELS + ["emamba_tiny"]) == set(ALL_MODELS)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_parameter_counts_match_the_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.003, params
    assert model.mixer == ("mlp" if name.endswith("_mlp") else "einfft")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.0)
    model.train()
    x = torch.randn(2, 3, SMALL, SMALL)
    cls_logits, aux_logits, box = model(x)
    assert cls_logits.shape == (2, 7) and aux_logits.shape == (2, (SMALL // 32) ** 2, 7)
    assert len(box) == 4
    (cls_logits.sum() + aux_logits.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_eval_output_is_cls_plus_half_max_aux():
    torch.manual_seed(0)
    model = timm.create_model("emamba_tiny", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = model.head(tokens[:, 0]) + 0.5 * model.aux_head(tokens[:, 1:]).max(1)[0]
        torch.testing.assert_close(model(x), expected)
        assert model.forward_head(tokens, pre_logits=True).shape == (2, model.num_features)


def test_token_label_false_is_a_plain_classifier():
    model = timm.create_model("emamba_tiny", num_classes=5, token_label=False).train()
    assert model.aux_head is None
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


def test_mix_token_is_undone_on_the_aux_logits(monkeypatch):
    """With a box covering the whole grid the network sees the reversed batch; un-mixing must restore it."""
    torch.manual_seed(0)
    model = timm.create_model("emamba_tiny", num_classes=4).train()
    x = torch.randn(3, 3, 64, 64)
    monkeypatch.setattr(emamba_mod, "rand_box", lambda h, w, lam, generator=None: (0, 0, 0, 0))
    cls_plain, aux_plain, box = model(x)
    assert box == (0, 0, 0, 0)
    monkeypatch.setattr(emamba_mod, "rand_box", lambda h, w, lam, generator=None: (0, 0, h, w))
    cls_mixed, aux_mixed, box = model(x)
    assert box == (0, 0, 2, 2)
    torch.testing.assert_close(cls_mixed, cls_plain.flip(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aux_mixed, aux_plain, rtol=1e-4, atol=1e-5)


def test_num_classes_in_chans_and_reset_classifier():
    model = timm.create_model("emamba_tiny", num_classes=3, in_chans=1).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    model.reset_classifier(11)
    assert model.get_classifier().out_features == 11 and model.aux_head.out_features == 11
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 11)
    model.reset_classifier(0)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, model.num_features)


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (96, 64)])
def test_any_multiple_of_32_works(size):
    model = timm.create_model("emamba_tiny").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 1000)


@pytest.mark.parametrize("size", [(224, 200), (63, 64), (16, 16)])
def test_other_sizes_raise_a_clear_error(size):
    model = timm.create_model("emamba_tiny").eval()
    with pytest.raises(ValueError, match="multiples of 32.*" + re.escape(f"got {size[0]}x{size[1]}")):
        model(torch.randn(1, 3, *size))


def test_wrong_channel_count_raises():
    model = timm.create_model("emamba_tiny").eval()
    with pytest.raises(ValueError, match="expects images"):
        model(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("name", ["emamba_tiny", "emamba_s_mlp"])
def test_features_only_matches_feature_info(name):
    model = timm.create_model(name, features_only=True).eval()
    channels = model.feature_info.channels()
    reductions = model.feature_info.reduction()
    assert reductions == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == channels
    assert [64 // f.shape[-1] for f in feats] == reductions
    model2 = timm.create_model(name, features_only=True, out_indices=(1, 2))
    assert model2.feature_info.reduction() == [8, 16]


def test_forward_intermediates():
    model = timm.create_model("emamba_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        nhwc = model.forward_intermediates(x, indices=[3], output_fmt="NHWC", intermediates_only=True)
    assert len(inter) == 4 and nhwc[0].shape == (1, 2, 2, model.embed_dims[-1])


def test_grad_checkpointing_gives_the_same_output_and_grads():
    torch.manual_seed(0)
    model = timm.create_model("emamba_tiny", token_label=False).train()
    x = torch.randn(2, 3, 64, 64)
    y1 = model(x)
    y1.sum().backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    y2 = model(x)
    y2.sum().backward()
    torch.testing.assert_close(y1, y2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g1[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["emamba_tiny", "emamba_s"])
def test_safetensors_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    clone = timm.create_model(name).eval()
    clone.load_state_dict(load_file(str(path)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))


def _to_original_layout(key: str) -> str:
    """Key names as the released SiMBA code wrote them (written independently of the filter's rules)."""
    key = key.replace(".token_mixer.", ".attn.").replace(".channel_mixer.", ".mlp.")
    if key.startswith("stem."):
        return "patch_embed1." + key[len("stem."):]
    if key.startswith("class_block."):
        return "post_network.0." + key[len("class_block."):]
    if key.startswith("norm."):
        return "norm4." + key[len("norm."):]
    m = re.match(r"stages\.(\d)\.(downsample|blocks|norm)\.(.*)", key)
    if m:
        stage, part, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
        prefix = {"downsample": f"patch_embed{stage}.", "blocks": f"block{stage}.", "norm": f"norm{stage}."}[part]
        return prefix + rest
    return key


@pytest.mark.parametrize("name", ["emamba_tiny", "emamba_s_mlp"])
def test_original_simba_state_dict_loads_through_the_filter(name):
    torch.manual_seed(0)
    source = timm.create_model(name).eval()
    original = {"model": {"module." + _to_original_layout(k): v for k, v in source.state_dict().items()}}
    assert any(k.startswith("module.block1.0.attn.A_log") for k in original["model"])
    target = timm.create_model(name).eval()
    filtered = checkpoint_filter_fn(original, target)
    result = target.load_state_dict(filtered, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_pretrained_cfg_and_timm_helpers():
    model = timm.create_model("emamba_s", pretrained=False)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.96
    assert cfg["interpolation"] == "bicubic" and cfg["first_conv"] == "stem.conv.0"
    assert cfg["mean"] == IMAGENET_DEFAULT_MEAN and cfg["std"] == IMAGENET_DEFAULT_STD
    no_wd = model.no_weight_decay()
    assert "stages.0.blocks.0.token_mixer.A_log" in no_wd and "class_block.token_mixer.D" in no_wd
    # timm's optimizer factory and layer-decay grouping accept the model
    create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    data_cfg = resolve_data_config({}, model=model)
    assert data_cfg["crop_pct"] == 0.96


def test_mamba_dt_init_survives_model_init():
    model = timm.create_model("emamba_tiny")
    bias = model.stages[0].blocks[0].token_mixer.dt_proj.bias.detach()
    dt = torch.nn.functional.softplus(bias)
    assert dt.max() <= 0.1 + 1e-6 and not torch.allclose(bias, torch.zeros_like(bias))


def test_bidirectional_and_paper_fft_options_build():
    model = timm.create_model("emamba_tiny", bidirectional=True, einfft_fft_mode="tokens").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_bf16_autocast_forward():
    model = timm.create_model("emamba_tiny").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out.float()).all()


def test_package_version():
    assert emamba.__version__
