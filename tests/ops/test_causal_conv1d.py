"""The fused causal depthwise conv1d + SiLU (``emamba.ops.causal_conv1d``) against its formula."""

from __future__ import annotations

import pytest
import torch

from emamba.ops import causal_conv1d_silu, causal_conv1d_silu_reference, scan_cpu
from emamba.ops import causal_conv1d as conv_mod

needs_kernel = pytest.mark.skipif(not scan_cpu.is_available()[0], reason="fused CPU kernel unavailable")


def leaves(batch, d, length, k, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, length, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(d, k, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(d, generator=g, dtype=dtype).requires_grad_() if with_bias else None
    return x, w, b


def value_and_grads(fn, x, w, b, dout):
    y = fn(x, w, b)
    inputs = [x, w] + ([b] if b is not None else [])
    return y, torch.autograd.grad(y, inputs, dout)


@needs_kernel
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("batch,d,length,k", [(2, 5, 37, 4), (3, 4, 1, 4), (1, 3, 2, 4), (2, 3, 9, 3), (2, 3, 9, 1)],
                         ids=["K4", "L1", "L<K-1", "K3", "K1"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)], ids=["fp32", "fp64"])
def test_kernel_matches_formula_values_and_grads(batch, d, length, k, with_bias, dtype, tol):
    x, w, b = leaves(batch, d, length, k, dtype, with_bias)
    dout = torch.randn(batch, d, length, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y, grads = value_and_grads(causal_conv1d_silu, x, w, b, dout)
    y_ref, grads_ref = value_and_grads(causal_conv1d_silu_reference, x, w, b, dout)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 10, msg=name)


@needs_kernel
def test_kernel_is_used_on_cpu_and_not_for_pure_pytorch_backends(monkeypatch):
    calls = []
    original = conv_mod._conv_fwd
    monkeypatch.setattr(conv_mod, "_conv_fwd", lambda *a: calls.append(1) or original(*a))
    x, w, b = leaves(2, 4, 8, 4, torch.float32, True)
    causal_conv1d_silu(x, w, b)
    assert calls == [1]
    for backend in ("reference", "torch"):
        causal_conv1d_silu(x, w, b, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the formula, in autocast's dtype
        y = causal_conv1d_silu(x, w, b)
    assert calls == [1] and y.dtype == torch.bfloat16


@needs_kernel
def test_gradcheck_fp64():
    x, w, b = leaves(2, 3, 11, 4, torch.float64, True)
    assert torch.autograd.gradcheck(causal_conv1d_silu, (x, w, b))


@needs_kernel
def test_torch_compile_fullgraph():
    x, w, b = leaves(2, 4, 16, 4, torch.float32, True)
    compiled = torch.compile(causal_conv1d_silu, fullgraph=True, backend="aot_eager")
    y = compiled(x, w, b)
    y.sum().backward()
    torch.testing.assert_close(y, causal_conv1d_silu_reference(x, w, b), rtol=2e-6, atol=2e-6)
    assert x.grad is not None and w.grad is not None and b.grad is not None


@pytest.mark.parametrize("shape_x,shape_w,shape_b,match", [
    ((4, 8), (4, 4), (4,), "x must be"),
    ((2, 4, 8), (5, 4), (5,), "weight must be"),
    ((2, 4, 8), (4, 1, 4), (4,), "weight must be"),
    ((2, 4, 8), (4, 4), (3,), "bias must have"),
])
def test_bad_shapes(shape_x, shape_w, shape_b, match):
    with pytest.raises(ValueError, match=match):
        causal_conv1d_silu(torch.randn(shape_x), torch.randn(shape_w), torch.randn(shape_b))


@needs_kernel
def test_custom_op_passes_opcheck():
    """torch.library.opcheck validates the fake (meta) kernel and the autograd registration."""
    x, w, b = leaves(2, 3, 9, 4, torch.float32, True)
    torch.library.opcheck(conv_mod._conv_fwd, (x, w, b))
    torch.library.opcheck(conv_mod._conv_fwd, (x, w, None))
