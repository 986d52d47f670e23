"""The Triton causal conv1d + SiLU kernels (emamba.ops.conv_triton) against the F.conv1d formula.

Without a CUDA device the kernels run through Triton's interpreter on CPU tensors (tiny tiles so that
several L tiles, masked channels and the left edge are exercised), and an offline compile for sm_90 checks
that the compiled mode accepts them too. With CUDA the same tests run the compiled kernels, and the
dispatch of ``causal_conv1d_silu`` to them (autograd, autocast) is checked as well.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read at every launch (see emamba.ops.scan_triton)

import pytest  # noqa: E402

from emamba.ops import causal_conv1d, conv_triton  # noqa: E402
from emamba.ops.causal_conv1d import causal_conv1d_silu, causal_conv1d_silu_reference  # noqa: E402
from triton_offline import compile_for_sm90  # noqa: E402

AVAILABLE, REASON = conv_triton.is_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"triton unavailable: {REASON}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(conv_triton, "BLOCK_D", 2)
    monkeypatch.setattr(conv_triton, "BLOCK_L", 8)


def _inputs(batch, d, length, k, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)  # noqa: E731
    return make(batch, d, length), make(d, k), make(d) if bias else None, make(batch, d, length)


def _reference(x, w, b, dout):
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    out = causal_conv1d_silu_reference(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout.double())
    return out, grads


def _assert_close(name, got, want, tol):
    err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{name}: max abs error / max |ref| = {err:.2e} > {tol:g}"


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("length", [2, 19, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_fp64(k, length, bias):
    x, w, b, dout = _inputs(2, 5, length, k, torch.float64, bias)  # d = 5: the last channel tile is masked
    ref_out, ref_grads = _reference(x, w, b, dout)
    _assert_close("out", conv_triton.forward(x, w, b), ref_out, 1e-12)
    grads = conv_triton.backward(dout, x, w, b)
    assert (grads[2] is None) == (not bias)
    for name, got, want in zip(("dx", "dweight", "dbias"), [g for g in grads if g is not None], ref_grads):
        assert got.dtype == torch.float64 and got.shape == want.shape
        _assert_close(name, got, want, 1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_dtypes(dtype, tol):
    x, w, b, dout = _inputs(2, 6, 27, 4, dtype)
    ref_out, ref_grads = _reference(x, w, b, dout)  # the same (rounded) inputs in fp64
    out = conv_triton.forward(x, w, b)
    assert out.dtype == dtype
    _assert_close("out", out, ref_out, tol)
    for name, got, want in zip(("dx", "dweight", "dbias"), conv_triton.backward(dout, x, w, b), ref_grads):
        assert got.dtype == dtype
        _assert_close(name, got, want, tol)


def test_registered_cuda_kernels_follow_the_custom_op_contract():
    """The functions behind the custom op's CUDA key: an empty dbias placeholder when there is no bias."""
    x, w, _, dout = _inputs(1, 3, 11, 4, torch.float64, bias=False)
    out = causal_conv1d._conv_fwd_cuda(x, w, None)
    dx, dweight, dbias = causal_conv1d._conv_bwd_cuda(dout, x, w, None)
    ref_out, (ref_dx, ref_dw) = _reference(x, w, None, dout)
    _assert_close("out", out, ref_out, 1e-12)
    _assert_close("dx", dx, ref_dx, 1e-12)
    _assert_close("dweight", dweight, ref_dw, 1e-12)
    assert dbias.numel() == 0


def test_bad_inputs(monkeypatch):
    x, w, b, _ = _inputs(1, 3, 9, 4, torch.float32)
    with pytest.raises(TypeError, match="weight"):
        conv_triton.forward(x, w.double(), b)
    with pytest.raises(TypeError, match="supports"):
        conv_triton.forward(x.int(), w.int(), None)
    with pytest.raises(ValueError, match="weight"):
        conv_triton.forward(x, w[:2], b)
    with pytest.raises(ValueError, match="dout"):
        conv_triton.backward(x[..., :4], x, w, b)
    monkeypatch.setattr(conv_triton, "BLOCK_L", 12)
    with pytest.raises(ValueError, match="power of two"):
        conv_triton.forward(x, w, b)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="CUDA"):
            conv_triton.forward(x, w, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the other tests compile the kernels for this GPU")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiles_for_sm90_offline(dtype):
    """The compiled mode (not the interpreter) accepts both kernels (see triton_offline)."""
    meta = {"K": 4, "HAS_BIAS": True, "ACC": "tl.float32", "BLOCK_D": 4, "BLOCK_L": 256}
    ptr = "*" + dtype
    specs = [
        dict(kernel="_conv_fwd_kernel", signature={"x_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr,
                                                   "d": "i32", "L": "i32"}),
        dict(kernel="_conv_bwd_kernel", signature={"dout_ptr": ptr, "x_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr,
                                                   "dx_ptr": ptr, "dw_part_ptr": "*fp32", "dbias_part_ptr": "*fp32",
                                                   "d": "i32", "L": "i32", "n_ltiles": "i32"}),
    ]
    proc = compile_for_sm90([dict(spec, module="emamba.ops.conv_triton", constexprs=meta, num_warps=4)
                             for spec in specs])
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "NO_PTXAS" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.stdout.count("COMPILED") == 2


@cuda_only
@pytest.mark.parametrize("autocast", [False, True])
def test_dispatch_on_cuda_with_autograd(autocast):
    x, w, b, dout = _inputs(2, 6, 300, 4, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = causal_conv1d_silu(*leaves)
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    ref_out, ref_grads = _reference(*(t.to(out.dtype) for t in (x, w, b)), dout.to(out.dtype))
    tol = 2e-2 if autocast else 2e-6
    _assert_close("out", out, ref_out, tol)
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        _assert_close(name, got, want, tol)


@cuda_only
def test_custom_op_passes_opcheck_on_cuda():
    """The CUDA registration of the conv custom op: schema, fake kernel, autograd and dispatch checks."""
    x, w, b, _ = _inputs(2, 6, 40, 4, torch.float32)
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))
    torch.library.opcheck(causal_conv1d._conv_fwd, args)
    torch.library.opcheck(causal_conv1d._conv_fwd, (x.detach(), w.detach(), None))
