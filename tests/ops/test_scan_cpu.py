"""Tests specific to the fused CPU selective-scan kernel (``emamba.ops.scan_cpu``).

Values and gradients are checked against ``selective_scan_reference`` (autograd through the sequential
loop). fp32 kernel results are compared with the reference evaluated in fp64 on the same inputs, so the
tolerance measures the kernel's own rounding error; fp64 is compared tightly.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from emamba.ops import scan_cpu, selective_scan
from emamba.ops.scan_reference import selective_scan_reference

CHUNK = scan_cpu.CHUNK
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(scope="module", autouse=True)
def _require_kernel():
    # Built lazily here (not at collection) so collecting the test suite stays fast.
    ok, reason = scan_cpu.is_available()
    if not ok:
        pytest.skip(f"fused CPU scan kernel unavailable: {reason}")


def make_inputs(batch, d, L, n, dtype=torch.float32, *, with_D=True, with_z=True, with_bias=True,
                softplus=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u = randn(batch, d, L)
    if softplus:
        delta = randn(batch, d, L) * 0.5 - 1.0  # raw pre-softplus values around softplus^-1(0.3)
    else:
        delta = torch.rand(batch, d, L, generator=g, dtype=torch.float64) * 0.5 + 0.05  # already positive
    A = -torch.exp(randn(d, n) * 0.5)
    B = randn(batch, n, L)
    C = randn(batch, n, L)
    D = randn(d) if with_D else None
    z = randn(batch, d, L) if with_z else None
    if with_bias:
        bias = randn(d) * 0.3 if softplus else torch.rand(d, generator=g, dtype=torch.float64) * 0.1
    else:
        bias = None
    return [t.to(dtype) if t is not None else None for t in (u, delta, A, B, C, D, z, bias)]


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def reference_grads(inputs, softplus, dout):
    """Output and input gradients of the reference, computed in fp64."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    out = selective_scan_reference(*leaves[:7], delta_bias=leaves[7], delta_softplus=softplus)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, dout.double())
    it = iter(grads)
    return out, [next(it) if t is not None else None for t in leaves]


def kernel_grads(inputs, softplus, dout):
    """Output and input gradients through the public entry point (custom op + registered autograd)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = selective_scan(*leaves[:7], delta_bias=leaves[7], delta_softplus=softplus, backend="cpu")
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, dout)
    it = iter(grads)
    return out, [next(it) if t is not None else None for t in leaves]


def check_against_reference(inputs, softplus, tol, seed=1):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(inputs[0].shape, generator=g, dtype=torch.float64).to(inputs[0].dtype)
    out, grads = kernel_grads(inputs, softplus, dout)
    ref_out, ref_grads = reference_grads(inputs, softplus, dout)
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
    errors = {"out": rel_err(out, ref_out)}
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        if ref is None:
            assert grad is None, name
            continue
        assert grad.shape == ref.shape and grad.dtype == inputs[0].dtype, name
        errors["d" + name] = rel_err(grad, ref)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


FLAGS = list(itertools.product([False, True], repeat=4))  # with_D, with_z, with_bias, softplus


@pytest.mark.parametrize("with_D,with_z,with_bias,softplus", FLAGS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_matches_reference_all_options(dtype, tol, with_D, with_z, with_bias, softplus):
    # L = 2 chunks + 5: crosses chunk boundaries and ends with a partial chunk.
    inputs = make_inputs(2, 3, 2 * CHUNK + 5, 5, dtype, with_D=with_D, with_z=with_z, with_bias=with_bias,
                         softplus=softplus)
    check_against_reference(inputs, softplus, tol)


@pytest.mark.parametrize("L", [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_lengths(L, dtype, tol):
    inputs = make_inputs(2, 3, L, 4, dtype, seed=L)
    check_against_reference(inputs, True, tol)


@pytest.mark.parametrize("n", [1, 7, 16, 33])
def test_state_sizes(n):
    # State sizes that are not multiples of the SIMD width exercise the vector-loop remainders.
    inputs = make_inputs(1, 2, CHUNK + 9, n, torch.float32, seed=n)
    check_against_reference(inputs, True, 1e-4)


def test_fp32_realistic_size():
    # Mamba-like magnitudes at a size where fp32 rounding accumulates over a long sequence.
    inputs = make_inputs(2, 8, 700, 16, torch.float32, seed=3)
    check_against_reference(inputs, True, 1e-4)


def test_thread_count_independent():
    # Large enough (d*L*n) that the backward splits d into one block per thread, so the dB/dC block
    # accumulators and their reduction are exercised; the single-thread run uses one block.
    inputs = make_inputs(2, 16, 300, 32, torch.float64, seed=4)
    dout = torch.randn_like(inputs[0])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, grads1 = kernel_grads(inputs, True, dout)
        torch.set_num_threads(max(2, before))
        out2, grads2 = kernel_grads(inputs, True, dout)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out1, out2, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_more_threads_than_channels():
    # d = 1 < thread count: a single block owns all rows.
    inputs = make_inputs(3, 1, CHUNK + 2, 4, torch.float64, seed=5)
    check_against_reference(inputs, True, 1e-10)


@pytest.mark.parametrize("everything", [True, False])
def test_gradcheck(everything):
    inputs = make_inputs(1, 2, CHUNK + 3, 3, torch.float64, with_D=everything, with_z=everything,
                         with_bias=everything, softplus=everything, seed=6)
    leaves = [t.requires_grad_() if t is not None else None for t in inputs]

    def fn(*args):
        return selective_scan(*args[:7], delta_bias=args[7], delta_softplus=everything, backend="cpu")

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_checkpoints_are_chunk_boundary_states():
    batch, d, L, n = 2, 3, 2 * CHUNK + 7, 4
    u, delta, A, B, C, D, z, bias = make_inputs(batch, d, L, n, torch.float64, seed=7)
    out, checkpoints = scan_cpu.forward(u, delta, A, B, C, D, z, bias, True)
    assert checkpoints.shape == scan_cpu.checkpoint_shape(batch, d, L, n) == (batch, d, 3, n)
    assert checkpoints.dtype == u.dtype
    # Recompute the states with a plain loop and compare at the end of every chunk (last = final state).
    dt = torch.nn.functional.softplus(delta + bias[None, :, None])
    h = torch.zeros(batch, d, n, dtype=torch.float64)
    expected = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        if (t + 1) % CHUNK == 0 or t == L - 1:
            expected.append(h.clone())
    torch.testing.assert_close(checkpoints, torch.stack(expected, dim=2), rtol=1e-12, atol=1e-12)


def test_checkpoint_shape_integer_arithmetic():
    assert scan_cpu.checkpoint_shape(2, 3, 1, 4) == (2, 3, 1, 4)
    assert scan_cpu.checkpoint_shape(2, 3, CHUNK, 4) == (2, 3, 1, 4)
    assert scan_cpu.checkpoint_shape(2, 3, CHUNK + 1, 4) == (2, 3, 2, 4)
    assert all(type(s) is int for s in scan_cpu.checkpoint_shape(1, 1, 100, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_contract(dtype):
    # Direct module contract: None for absent optional inputs, shapes/dtypes of the rest.
    batch, d, L, n = 2, 3, CHUNK + 1, 4
    u, delta, A, B, C, _, _, _ = make_inputs(batch, d, L, n, dtype, with_D=False, with_z=False,
                                             with_bias=False, softplus=False)
    out, checkpoints = scan_cpu.forward(u, delta, A, B, C, None, None, None, False)
    assert out.shape == u.shape and out.dtype == dtype
    grads = scan_cpu.backward(torch.ones_like(out), u, delta, A, B, C, None, None, None, checkpoints, False)
    assert len(grads) == 8
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = grads
    assert dD is None and dz is None and ddelta_bias is None
    for grad, ref in ((du, u), (ddelta, delta), (dA, A), (dB, B), (dC, C)):
        assert grad.shape == ref.shape and grad.dtype == dtype


def test_noncontiguous_inputs_through_entry_point():
    inputs = make_inputs(2, 3, CHUNK + 5, 4, torch.float64, seed=8)
    u, delta, A, B, C, D, z, bias = inputs
    # Same values, transposed storage.
    B_nc = B.transpose(1, 2).contiguous().transpose(1, 2)
    u_nc = u.transpose(0, 2).contiguous().transpose(0, 2)
    assert not B_nc.is_contiguous() and not u_nc.is_contiguous()
    out = selective_scan(u_nc, delta, A, B_nc, C, D, z, bias, True, backend="cpu")
    ref = selective_scan_reference(u, delta, A, B, C, D, z, bias, True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_is_available_cached_and_never_raises():
    first = scan_cpu.is_available()
    assert first is scan_cpu.is_available()
    assert first[0] is True and isinstance(first[1], str)


def test_extreme_decays_stay_finite():
    # Very large steps drive exp(dt*A) far below the fp32 range: the vectorised exp must give 0, not NaN.
    inputs = make_inputs(1, 2, CHUNK + 1, 4, torch.float32, seed=9)
    u, delta, A, B, C, D, z, bias = inputs
    delta = delta.clone()
    delta[..., ::3] = 200.0  # softplus(200) = 200; dt*A down to ~ -1000
    out, _ = scan_cpu.forward(u, delta, A, B, C, D, z, bias, True)
    ref = selective_scan_reference(*(t.double() for t in (u, delta, A, B, C, D, z, bias)), delta_softplus=True)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4
