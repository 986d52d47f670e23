"""EMamba-TS shapes, feature modes, the TSLib ``Model(configs)`` interface and gradients."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from emamba.layers import EinFFT, MambaMixer
from emamba.models.forecasting import EMambaTS, Model, RevIN

TINY = dict(d_model=8, e_layers=1, d_ff=16, d_state=4)


@pytest.mark.parametrize("pred_len", [96, 192, 336, 720])
@pytest.mark.parametrize("tokenization", ["patch", "variate"])
def test_shapes_every_horizon(pred_len, tokenization):
    model = EMambaTS(96, pred_len, 7, tokenization=tokenization, **TINY)
    assert model(torch.randn(2, 96, 7)).shape == (2, pred_len, 7)


@pytest.mark.parametrize("features, enc_in, c_out", [("M", 7, 7), ("S", 1, 1), ("MS", 7, 1)])
def test_feature_modes(features, enc_in, c_out):
    model = EMambaTS(48, 24, enc_in, c_out=c_out, **TINY)
    x = torch.randn(3, 48, enc_in)
    y = model(x)
    assert y.shape == (3, 24, c_out)
    if features == "MS":  # the target (last variate) is what comes out: same as the full model's last column
        full = EMambaTS(48, 24, enc_in, **TINY)
        full.load_state_dict(model.state_dict())
        torch.testing.assert_close(full.eval()(x)[..., -1:], model.eval()(x))


def test_reuses_library_layers():
    model = EMambaTS(96, 96, 7, **TINY)
    assert any(isinstance(m, MambaMixer) for m in model.modules())
    assert any(isinstance(m, EinFFT) for m in model.modules())
    assert model.blocks[0].token_mixer.d_inner == TINY["d_ff"]
    assert model.num_tokens == 7  # (96 + 16 - 16) // 16 + 1 patches (the end padded by one stride)
    assert EMambaTS(96, 96, 7, stride=8, **TINY).num_tokens == 12


@pytest.mark.parametrize("affine, subtract_last", [(True, False), (False, False), (True, True), (False, True)])
def test_revin_roundtrip_and_scale_equivariance(affine, subtract_last):
    revin = RevIN(3, affine=affine, subtract_last=subtract_last)
    assert len(list(revin.parameters())) == (2 if affine else 0)
    if affine:
        with torch.no_grad():
            revin.weight.copy_(torch.tensor([0.5, 2.0, 1.5]))
            revin.bias.copy_(torch.tensor([0.1, -0.3, 0.0]))
    x = torch.randn(4, 50, 3) * 5 + 2
    z, stats = revin.normalize(x)
    torch.testing.assert_close(revin.denormalize(z, stats), x, rtol=1e-4, atol=1e-4)
    plain, _ = RevIN(3, affine=False, subtract_last=subtract_last).normalize(x)
    assert plain.std(dim=1, unbiased=False).sub(1).abs().max() < 1e-4  # unit scale either way
    if subtract_last:  # centred on the last value, not on the mean
        assert plain[:, -1].abs().max() < 1e-6 and plain.mean(dim=1).abs().max() > 1e-3
    else:
        assert plain.mean(dim=1).abs().max() < 1e-5
    model = EMambaTS(32, 8, 3, revin_affine=affine, subtract_last=subtract_last, **TINY).eval()
    x = torch.randn(2, 32, 3)
    torch.testing.assert_close(model(x * 10 + 3), model(x) * 10 + 3, rtol=1e-3, atol=1e-3)


def test_tslib_model_four_tensor_forward():
    configs = SimpleNamespace(
        task_name="long_term_forecast", seq_len=96, label_len=48, pred_len=192, enc_in=7, c_out=7,
        d_model=8, e_layers=1, d_ff=16, dropout=0.1, patch_len=16, stride=8, d_state=4, revin=1,
    )
    model = Model(configs)
    x_enc, x_mark = torch.randn(2, 96, 7), torch.randn(2, 96, 4)
    x_dec, x_mark_dec = torch.zeros(2, 48 + 192, 7), torch.randn(2, 48 + 192, 4)
    assert model(x_enc, x_mark, x_dec, x_mark_dec).shape == (2, 192, 7)
    revin = model.model.revin
    assert (revin.affine, revin.subtract_last) == (True, False)  # absent attributes: the defaults
    revin = Model(SimpleNamespace(**{**vars(configs), "affine": 0, "subtract_last": 1})).model.revin
    assert (revin.affine, revin.subtract_last) == (False, True)  # PatchTST's argument names
    with pytest.raises(ValueError, match="forecasting tasks only"):
        Model(SimpleNamespace(**{**vars(configs), "task_name": "imputation"}))


def test_backward_reaches_every_parameter():
    model = EMambaTS(96, 24, 7, **TINY)
    loss = model(torch.randn(2, 96, 7)).pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_bad_configs():
    with pytest.raises(ValueError, match="divisible by einfft_blocks"):
        EMambaTS(96, 96, 7, d_model=10)
    with pytest.raises(ValueError, match="tokenization"):
        EMambaTS(96, 96, 7, tokenization="pixel")
    with pytest.raises(ValueError, match="c_out"):
        EMambaTS(96, 96, 1, c_out=7)
    with pytest.raises(ValueError, match="expects"):
        EMambaTS(96, 96, 7, **TINY)(torch.randn(2, 48, 7))


def _window_cycle(cycle: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Rows start, start + 1, ... of the cycle table, wrapping around: the definition, step by step."""
    return torch.stack([cycle[(start + i) % cycle.shape[0]] for i in range(length)])


def test_learned_cycle_is_removed_from_the_input_and_added_to_the_forecast():
    """With RevIN off the model is cycle(out) + inner(x - cycle(in)); phases wrap around the table."""
    seq_len, pred_len, enc_in, cycle_len = 32, 8, 3, 24
    model = EMambaTS(seq_len, pred_len, enc_in, revin=False, cycle_len=cycle_len, **TINY).eval()
    with torch.no_grad():
        model.cycle.normal_()
    plain = EMambaTS(seq_len, pred_len, enc_in, revin=False, **TINY).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "cycle"})
    x = torch.randn(3, seq_len, enc_in)
    phase = torch.tensor([0, 5, 23])  # 23 + 32 steps wraps the table more than once
    expected = torch.stack([
        plain(x[b : b + 1] - _window_cycle(model.cycle, p, seq_len))[0] + _window_cycle(model.cycle, p + seq_len, pred_len)
        for b, p in enumerate(phase.tolist())
    ])
    torch.testing.assert_close(model(x, phase), expected)
    torch.testing.assert_close(model(x, phase + cycle_len), expected)  # only the phase modulo cycle_len counts


def test_learned_cycle_starts_at_zero_and_is_trained():
    model = EMambaTS(96, 24, 7, cycle_len=24, **TINY)
    assert model.cycle.shape == (24, 7) and not model.cycle.any()
    model(torch.randn(2, 96, 7), torch.tensor([3, 17])).pow(2).mean().backward()
    assert model.cycle.grad is not None and model.cycle.grad.abs().sum() > 0


def test_learned_cycle_bad_inputs():
    model = EMambaTS(96, 24, 7, cycle_len=24, **TINY)
    with pytest.raises(ValueError, match="needs cycle_index"):
        model(torch.randn(2, 96, 7))
    with pytest.raises(ValueError, match=r"\(2,\) integer tensor"):
        model(torch.randn(2, 96, 7), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\(2,\) integer tensor"):
        model(torch.randn(2, 96, 7), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cycle_len must be >= 0"):
        EMambaTS(96, 24, 7, cycle_len=-1)


def test_tslib_model_passes_the_cycle_index():
    configs = SimpleNamespace(seq_len=96, pred_len=24, enc_in=7, cycle_len=24, d_model=8, d_ff=16, d_state=4)
    model = Model(configs).eval()
    assert model.model.cycle.shape == (24, 7)
    x = torch.randn(2, 96, 7)
    assert model(x, None, None, None, cycle_index=torch.tensor([0, 1])).shape == (2, 24, 7)
    with pytest.raises(ValueError, match="needs cycle_index"):
        model(x, None, None, None)


def test_linear_skip_adds_a_linear_forecast_of_the_normalised_look_back():
    """RevIN on: y = denorm(inner(x_n) + W x_n + b) with x_n the normalised window, W shared by variates."""
    seq_len, pred_len, enc_in = 32, 8, 3
    model = EMambaTS(seq_len, pred_len, enc_in, linear_skip=True, **TINY).eval()
    assert not model.skip.weight.any() and not model.skip.bias.any()  # starts as the plain model
    plain = EMambaTS(seq_len, pred_len, enc_in, **TINY).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("skip.")})
    x = torch.randn(4, seq_len, enc_in) * 3 + 1
    torch.testing.assert_close(model(x), plain(x))
    with torch.no_grad():
        model.skip.weight.normal_(std=0.1)
        model.skip.bias.normal_()
    x_n, stats = model.revin.normalize(x)
    linear = torch.einsum("bsc,ps->bpc", x_n, model.skip.weight) + model.skip.bias[:, None]
    # RevIN's inverse is affine, so the skip adds denorm(linear) - denorm(0) to the plain model's forecast.
    offset = model.revin.denormalize(torch.zeros_like(linear), stats)
    torch.testing.assert_close(model(x) - plain(x), model.revin.denormalize(linear, stats) - offset)


def test_linear_skip_is_trained_and_reaches_the_tslib_model():
    model = EMambaTS(96, 24, 7, linear_skip=True, **TINY)
    model(torch.randn(2, 96, 7)).pow(2).mean().backward()
    assert model.skip.weight.grad.abs().sum() > 0 and model.skip.bias.grad.abs().sum() > 0
    tslib = Model(SimpleNamespace(seq_len=96, pred_len=24, enc_in=7, linear_skip=1, d_model=8, d_ff=16, d_state=4))
    assert tslib.model.skip.weight.shape == (24, 96)


def test_linear_only_is_revin_cycle_and_the_linear_path_without_the_blocks():
    """linear_only: y = denorm(W (x_n - cycle) + b + cycle) (CycleNet-Linear); the blocks are not run."""
    seq_len, pred_len, enc_in, cycle_len = 32, 8, 3, 5
    model = EMambaTS(seq_len, pred_len, enc_in, linear_skip=True, cycle_len=cycle_len, **TINY).eval()
    with torch.no_grad():
        for p in (model.skip.weight, model.skip.bias, model.cycle, model.revin.weight, model.revin.bias):
            p.normal_(std=0.3)
    x, phase = torch.randn(4, seq_len, enc_in) * 2 + 1, torch.tensor([0, 1, 3, 7])
    x_n, stats = model.revin.normalize(x)
    steps = torch.arange(seq_len + pred_len)
    cycle = model.cycle[(phase[:, None] + steps) % cycle_len]  # (B, seq_len + pred_len, C)
    linear = torch.einsum("bsc,ps->bpc", x_n - cycle[:, :seq_len], model.skip.weight) + model.skip.bias[:, None]
    expected = model.revin.denormalize(linear + cycle[:, seq_len:], stats)
    blocks_ran = []
    model.blocks[0].register_forward_hook(lambda *_: blocks_ran.append(1))
    torch.testing.assert_close(model(x, phase, linear_only=True), expected)
    assert not blocks_ran
    assert not torch.allclose(model(x, phase), expected)  # the full model adds the head's forecast
    assert blocks_ran
    model.zero_head()
    torch.testing.assert_close(model(x, phase), expected)  # a zeroed head: exactly the linear forecaster


def test_linear_parameters_are_the_linear_path_cycle_and_revin_affine():
    model = EMambaTS(32, 8, 3, linear_skip=True, cycle_len=4, decomp_kernel=5, **TINY)
    expected = [model.skip.weight, model.skip.bias, model.trend_head.weight, model.trend_head.bias,
                model.revin.weight, model.revin.bias, model.cycle]
    assert [id(p) for p in model.linear_parameters()] == [id(p) for p in expected]
    bare = EMambaTS(32, 8, 3, linear_skip=True, revin_affine=False, **TINY)
    assert [id(p) for p in bare.linear_parameters()] == [id(bare.skip.weight), id(bare.skip.bias)]
    with pytest.raises(ValueError, match="linear_skip"):
        EMambaTS(32, 8, 3, **TINY)(torch.randn(2, 32, 3), linear_only=True)
    tslib = Model(SimpleNamespace(seq_len=32, pred_len=8, enc_in=3, linear_skip=1, d_model=8, d_ff=16, d_state=4))
    x = torch.randn(2, 32, 3)
    torch.testing.assert_close(tslib(x, None, None, None, linear_only=True), tslib.model(x, linear_only=True))


def test_time_tokens_go_in_front_so_a_forward_scan_sees_them():
    """Calendar tokens are placed before the variates: the first block's forward Mamba scan then carries
    them into the variate tokens, and the calendar tokens do not see the series (placed after, the reverse).
    No parameters are added, and RevIN's scale equivariance still holds because the calendar features are
    not normalised with the series."""
    model = EMambaTS(32, 8, 3, tokenization="variate", time_tokens=True, **TINY).eval()
    plain = EMambaTS(32, 8, 3, tokenization="variate", **TINY).eval()
    assert model.state_dict().keys() == plain.state_dict().keys()
    x, mark = torch.randn(2, 32, 3), torch.rand(2, 32, 4) - 0.5
    scans = []
    model.blocks[0].token_mixer.register_forward_hook(lambda module, args, output: scans.append(output))
    out = model(x, x_mark=mark)
    model(x + torch.randn_like(x), x_mark=mark)
    model(x, x_mark=mark.flip(1))
    assert scans[0].shape == (2, 4 + 3, 8)  # 4 calendar tokens, then 3 variates
    torch.testing.assert_close(scans[1][:, :4], scans[0][:, :4])  # the calendar tokens never see the series
    assert ((scans[2][:, 4:] - scans[0][:, 4:]).abs().amax(dim=-1) > 1e-6).all()  # every variate sees them
    assert out.shape == (2, 8, 3)
    changed = (out - model(x, x_mark=mark.flip(1))).abs().amax(dim=1)  # (B, C): every variate moves
    assert (changed > 1e-6).all()
    torch.testing.assert_close(model(x * 10 + 3, x_mark=mark), out * 10 + 3, rtol=1e-3, atol=1e-3)


def test_time_tokens_bad_inputs_and_the_tslib_model():
    with pytest.raises(ValueError, match="time_tokens needs tokenization='variate'"):
        EMambaTS(96, 24, 7, time_tokens=True, **TINY)
    model = EMambaTS(96, 24, 7, tokenization="variate", time_tokens=True, **TINY)
    with pytest.raises(ValueError, match="needs x_mark"):
        model(torch.randn(2, 96, 7))
    with pytest.raises(ValueError, match="needs x_mark"):
        model(torch.randn(2, 96, 7), x_mark=torch.randn(2, 48, 4))
    configs = SimpleNamespace(seq_len=96, pred_len=24, enc_in=7, tokenization="variate", time_tokens=1,
                              d_model=8, d_ff=16, d_state=4)
    tslib = Model(configs).eval()
    x, mark = torch.randn(2, 96, 7), torch.rand(2, 96, 4) - 0.5
    torch.testing.assert_close(tslib(x, mark, None, None), tslib.model(x, x_mark=mark))
    plain = Model(SimpleNamespace(**{**vars(configs), "time_tokens": 0})).eval()
    torch.testing.assert_close(plain(x, mark, None, None), plain(x, None, None, None))  # marks unused without it


def test_decomposition_trend_is_a_centred_moving_average_with_repeated_ends():
    model = EMambaTS(32, 8, 2, decomp_kernel=5, **TINY)
    x = torch.randn(3, 32, 2, dtype=torch.float64)
    seasonal, trend = model.decompose(x)
    padded = torch.cat([x[:, :1].expand(-1, 2, -1), x, x[:, -1:].expand(-1, 2, -1)], dim=1)
    expected = torch.stack([padded[:, t : t + 5].mean(dim=1) for t in range(32)], dim=1)
    torch.testing.assert_close(trend, expected)
    torch.testing.assert_close(seasonal + trend, x)
    line = torch.arange(32, dtype=torch.float64).view(1, 32, 1).expand(1, 32, 2)
    torch.testing.assert_close(model.decompose(line)[1][:, 2:-2], line[:, 2:-2])  # a line is all trend inside


def test_decomposition_feeds_the_seasonal_part_to_the_blocks_and_the_trend_to_a_linear_map():
    """RevIN off: y = inner(x - trend) + W trend + b, W starting as DLinear's 1 / seq_len."""
    seq_len, pred_len, enc_in = 32, 8, 3
    model = EMambaTS(seq_len, pred_len, enc_in, revin=False, decomp_kernel=7, **TINY).eval()
    assert torch.equal(model.trend_head.weight, torch.full((pred_len, seq_len), 1 / seq_len))
    plain = EMambaTS(seq_len, pred_len, enc_in, revin=False, **TINY).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("trend_head.")})
    with torch.no_grad():
        model.trend_head.weight.normal_(std=0.1)
        model.trend_head.bias.normal_()
    x = torch.randn(4, seq_len, enc_in)
    seasonal, trend = model.decompose(x)
    linear = torch.einsum("bsc,ps->bpc", trend, model.trend_head.weight) + model.trend_head.bias[:, None]
    torch.testing.assert_close(model(x), plain(seasonal) + linear)
    model.train()
    model(x).pow(2).mean().backward()
    assert model.trend_head.weight.grad.abs().sum() > 0
    tslib = Model(SimpleNamespace(seq_len=96, pred_len=24, enc_in=7, decomp_kernel=25, d_model=8, d_ff=16, d_state=4))
    assert tslib.model.decomp_kernel == 25 and tslib.model.trend_head.weight.shape == (24, 96)


@pytest.mark.parametrize("kernel", [-1, 4, 33])
def test_decomposition_bad_kernels(kernel):
    with pytest.raises(ValueError, match="decomp_kernel must be 0"):
        EMambaTS(32, 8, 3, decomp_kernel=kernel, **TINY)
