"""EinFFT, the Mamba mixer and the conv-MLP mixers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from emamba.layers import ConvMlp, EinFFT, MambaMixer, Mlp


def einfft_by_the_paper(module: EinFFT, x: torch.Tensor) -> torch.Tensor:
    """Independent restatement of EinFFT with complex tensors and einsum (no stacked-real GEMM trick)."""
    b, n, c = x.shape
    h = x.reshape(b, n, module.num_blocks, module.block_size)
    dims = (1, 2) if module.fft_mode == "tokens_blocks" else (1,)
    h = torch.fft.fftn(h, dim=dims, norm="ortho")
    w1 = torch.complex(module.complex_weight_1[0], module.complex_weight_1[1])
    b1 = torch.complex(module.complex_bias_1[0], module.complex_bias_1[1])
    w2 = torch.complex(module.complex_weight_2[0], module.complex_weight_2[1])
    b2 = torch.complex(module.complex_bias_2[0], module.complex_bias_2[1])
    h = torch.einsum("...bd,bdk->...bk", h, w1) + b1
    h = torch.complex(F.relu(h.real), F.relu(h.imag))
    h = torch.einsum("...bd,bdk->...bk", h, w2) + b2
    h = torch.complex(F.softshrink(h.real, 0.01), F.softshrink(h.imag, 0.01))
    return torch.fft.ifftn(h, dim=dims, norm="ortho").real.reshape(b, n, c)


@pytest.mark.parametrize("dim", [8, 64, 448])
def test_einfft_parameter_count(dim):
    assert sum(p.numel() for p in EinFFT(dim).parameters()) == dim * dim + 4 * dim


@pytest.mark.parametrize("fft_mode", ["tokens_blocks", "tokens"])
def test_einfft_matches_complex_einsum_statement(fft_mode):
    torch.manual_seed(0)
    module = EinFFT(32, fft_mode=fft_mode)
    with torch.no_grad():  # larger weights so that ReLU and soft-shrink are both active
        for p in module.parameters():
            p.mul_(10)
    x = torch.randn(3, 17, 32)
    out = module(x)
    assert out.dtype == torch.float32 and not out.is_complex()
    torch.testing.assert_close(out, einfft_by_the_paper(module, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fft_mode", ["tokens_blocks", "tokens"])
@pytest.mark.parametrize("tokens", [1, 2, 16, 17])
def test_einfft_half_and_full_spectrum_paths_agree(fft_mode, tokens):
    # The real-FFT (half spectrum) path and the complex-FFT (full spectrum) path are two computations of
    # the same function; fp64 makes any algebra slip show far above rounding.
    torch.manual_seed(0)
    module = EinFFT(32, fft_mode=fft_mode).double()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(10)
    x = torch.randn(3, tokens, 32, dtype=torch.float64)
    grads = []
    for path in (module._half_spectrum, module._full_spectrum):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        out = path(xi)
        out.square().sum().backward()
        grads.append([out.detach(), xi.grad] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0][0], einfft_by_the_paper(module, x), rtol=1e-10, atol=1e-12)


def test_einfft_picks_the_half_spectrum_for_long_sequences():
    module = EinFFT(32)
    assert module._use_half_spectrum(torch.zeros(1, 17, 32))  # 17 tokens > 32 channels / 2
    assert not module._use_half_spectrum(torch.zeros(8, 16, 32))


def test_einfft_inference_weight_cache_follows_parameter_changes():
    torch.manual_seed(0)
    module = EinFFT(16).eval()
    fresh = EinFFT(16)
    x = torch.randn(2, 40, 16)
    with torch.inference_mode():
        module(x)  # fills the cache
        with torch.no_grad():
            module.complex_weight_1.mul_(3.0)  # in place: same storage, new version
        fresh.load_state_dict(module.state_dict())
        torch.testing.assert_close(module(x), fresh(x))
        module.load_state_dict(EinFFT(16).state_dict())  # load_state_dict copies in place as well
        fresh.load_state_dict(module.state_dict())
        torch.testing.assert_close(module(x), fresh(x))
    # with autograd the weights are rebuilt every call (gradients reach the parameters)
    module(x).sum().backward()
    assert module.complex_weight_1.grad is not None


def test_einfft_does_not_cache_under_torch_distributed(tmp_path):
    import torch.distributed as dist

    module = EinFFT(16).eval()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with torch.inference_mode():
            module(torch.randn(2, 40, 16))
        assert module._weight_cache is None
    finally:
        dist.destroy_process_group()
    with torch.inference_mode():
        module(torch.randn(2, 40, 16))
    assert module._weight_cache is not None


def test_einfft_modes_differ_and_are_real():
    torch.manual_seed(0)
    a, b = EinFFT(16), EinFFT(16, fft_mode="tokens")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, 16)
    assert not torch.allclose(a(x), b(x))


def test_einfft_keeps_dtype_under_bf16_autocast():
    module = EinFFT(16)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), module(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_einfft_gradients_and_errors():
    module = EinFFT(16)
    x = torch.randn(2, 5, 16, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())
    with pytest.raises(ValueError, match="divisible"):
        EinFFT(18)
    with pytest.raises(ValueError, match="fft_mode"):
        EinFFT(16, fft_mode="spatial")
    with pytest.raises(ValueError, match="expects"):
        module(torch.randn(2, 5, 12))


def test_mamba_mixer_shapes_and_parameter_names():
    torch.manual_seed(0)
    mixer = MambaMixer(32, d_state=8)
    assert mixer.dt_rank == math.ceil(32 / 16)
    names = {n for n, _ in mixer.named_parameters()}
    assert names == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                     "dt_proj.bias", "A_log", "D", "out_proj.weight"}
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and mixer.x_proj.bias is None
    torch.testing.assert_close(-torch.exp(mixer.A_log[0]), -torch.arange(1, 9, dtype=torch.float32))
    x = torch.randn(2, 11, 32, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert all(p.grad is not None for p in mixer.parameters())


def test_mamba_dt_initialisation():
    mixer = MambaMixer(64, d_state=4)
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    # log-uniform: the spread covers most of the two decades
    assert dt.min() < 5e-3 and dt.max() > 2e-2


def test_mamba_mixer_is_causal():
    torch.manual_seed(0)
    mixer = MambaMixer(16, d_state=4)
    x = torch.randn(1, 10, 16)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(mixer(x)[:, :6], mixer(x2)[:, :6])


def test_bidirectional_mixer_sees_the_future():
    torch.manual_seed(0)
    mixer = MambaMixer(16, d_state=4, bidirectional=True)
    names = {n for n, _ in mixer.named_parameters()}
    assert {"conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.bias", "A_b_log", "D_b"} <= names
    x = torch.randn(1, 10, 16)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    assert not torch.allclose(mixer(x)[:, :6], mixer(x2)[:, :6])
    uni = MambaMixer(16, d_state=4)
    assert sum(p.numel() for p in mixer.parameters()) > sum(p.numel() for p in uni.parameters())


def test_mamba_matches_reference_backend():
    # auto (fused conv + scan kernels on CPU) against the pure-PyTorch path: values and gradients
    torch.manual_seed(0)
    mixer = MambaMixer(16, d_state=8)
    ref = MambaMixer(16, d_state=8, backend="reference")
    ref.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 40, 16)
    dout = torch.randn(2, 40, 16)
    grads = {}
    for name, module in (("auto", mixer), ("reference", ref)):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.backward(dout)
        grads[name] = (out.detach(), xi.grad, module.conv1d.weight.grad, module.conv1d.bias.grad,
                       module.in_proj.weight.grad)
    for got, want in zip(grads["auto"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_mamba_channels_first_projections_match_module_calls(bidirectional):
    # Without autograd the mixer applies its plain Linear layers as channels-first GEMMs (no layout
    # copies); with autograd, or with a hook on them, it calls the modules. A plain conv1d runs as the
    # fused causal conv op; a hooked one is called as the module. Same values either way, and the hooks
    # see every call.
    torch.manual_seed(0)
    mixer = MambaMixer(24, d_state=8, bidirectional=bidirectional)
    x = torch.randn(3, 17, 24)
    with torch.no_grad():
        fast = mixer(x)
    module_calls = mixer(x)  # autograd on: module calls
    assert fast.is_contiguous() and module_calls.requires_grad
    torch.testing.assert_close(fast, module_calls.detach(), rtol=1e-5, atol=1e-6)

    calls = []
    names = ["in_proj", "conv1d", "x_proj", "out_proj"] + (["conv1d_b", "x_proj_b"] if bidirectional else [])
    handles = [getattr(mixer, n).register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n in names]
    try:
        with torch.no_grad():
            hooked = mixer(x)
    finally:
        for h in handles:
            h.remove()
    assert sorted(calls) == sorted(names)
    torch.testing.assert_close(fast, hooked, rtol=1e-5, atol=1e-6)


def test_mamba_mixer_rejects_wrong_width():
    with pytest.raises(ValueError, match="expects"):
        MambaMixer(16)(torch.randn(2, 5, 8))


def test_conv_mlp_and_mlp():
    mixer = ConvMlp(8, 32)
    x = torch.randn(2, 12, 8)
    assert mixer(x, 3, 4).shape == x.shape
    with pytest.raises(ValueError, match="grid"):
        mixer(x, 4, 4)
    assert Mlp(8, 32)(x).shape == x.shape
    hidden = 32
    assert sum(p.numel() for p in ConvMlp(8, hidden).parameters()) == 8 * hidden + hidden + 9 * hidden + hidden + hidden * 8 + 8
