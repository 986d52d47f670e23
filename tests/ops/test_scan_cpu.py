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
from scan_inputs import NAMES, as_args, make_inputs, record_save_checkpoints, reference_grads, rel_err

CHUNK = scan_cpu.CHUNK


@pytest.fixture(scope="module", autouse=True)
def _require_kernel():
    # Built lazily here (not at collection) so collecting the test suite stays fast.
    ok, reason = scan_cpu.is_available()
    if not ok:
        pytest.skip(f"fused CPU scan kernel unavailable: {reason}")


def cpu_inputs(batch, d, L, n, dtype=torch.float32, *, softplus=True, seed=0, **optional):
    """Inputs for a scan with/without softplus: dt around softplus(-1) ~ 0.3, or positive raw steps."""
    return make_inputs(batch, d, L, n, dtype=dtype, seed=seed, delta_init="softplus" if softplus else "positive",
                       A_in_fp64=True, **optional)


def kernel_grads(inputs, softplus, dout):
    """Output and input gradients through the public entry point (custom op + registered autograd)."""
    leaves = {k: inputs[k].detach().clone().requires_grad_() if inputs[k] is not None else None for k in NAMES}
    out = selective_scan(**leaves, delta_softplus=softplus, backend="cpu")
    present = [k for k in NAMES if leaves[k] is not None]
    grads = dict(zip(present, torch.autograd.grad(out, [leaves[k] for k in present], dout)))
    return out, {k: grads.get(k) for k in NAMES}


def check_against_reference(inputs, softplus, tol, seed=1):
    g = torch.Generator().manual_seed(seed)
    u = inputs["u"]
    dout = torch.randn(u.shape, generator=g, dtype=torch.float64).to(u.dtype)
    out, grads = kernel_grads(inputs, softplus, dout)
    ref_out, ref_grads = reference_grads(inputs, softplus, dout)
    assert out.dtype == u.dtype and out.shape == u.shape
    errors = {"out": rel_err(out, ref_out)}
    for name in NAMES:
        grad, ref = grads[name], ref_grads[name]
        if ref is None:
            assert grad is None, name
            continue
        assert grad.shape == ref.shape and grad.dtype == u.dtype, name
        errors["d" + name] = rel_err(grad, ref)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}"


FLAGS = list(itertools.product([False, True], repeat=4))  # with_D, with_z, with_bias, softplus


@pytest.mark.parametrize("with_D,with_z,with_bias,softplus", FLAGS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_matches_reference_all_options(dtype, tol, with_D, with_z, with_bias, softplus):
    # L = 2 chunks + 5: crosses chunk boundaries and ends with a partial chunk.
    inputs = cpu_inputs(2, 3, 2 * CHUNK + 5, 5, dtype, D=with_D, z=with_z, delta_bias=with_bias, softplus=softplus)
    check_against_reference(inputs, softplus, tol)


@pytest.mark.parametrize("L", [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_lengths(L, dtype, tol):
    inputs = cpu_inputs(2, 3, L, 4, dtype, seed=L)
    check_against_reference(inputs, True, tol)


@pytest.mark.parametrize("n", [1, 7, 8, 16, 32, 33, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_state_sizes(n, dtype, tol):
    # 8, 16, 32 and 64 run the kernel's compile-time-n loops (state held in registers), the others the
    # run-time-n loops; sizes that are not multiples of the SIMD width exercise the vector-loop remainders.
    inputs = cpu_inputs(1, 2, CHUNK + 9, n, dtype, seed=n)
    check_against_reference(inputs, True, tol)


def test_fp32_realistic_size():
    # Mamba-like magnitudes at a size where fp32 rounding accumulates over a long sequence.
    inputs = cpu_inputs(2, 8, 700, 16, torch.float32, seed=3)
    check_against_reference(inputs, True, 1e-4)


def test_thread_count_independent():
    # Large enough (d*L*n) that the backward splits d into one block per thread, so the dB/dC block
    # accumulators and their reduction are exercised; the single-thread run uses one block.
    inputs = cpu_inputs(2, 16, 300, 32, torch.float64, seed=4)
    dout = torch.randn_like(inputs["u"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, grads1 = kernel_grads(inputs, True, dout)
        torch.set_num_threads(max(2, before))
        out2, grads2 = kernel_grads(inputs, True, dout)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out1, out2, rtol=1e-12, atol=1e-12)
    for name in NAMES:
        torch.testing.assert_close(grads1[name], grads2[name], rtol=1e-12, atol=1e-12)


def test_more_threads_than_channels():
    # d = 1 < thread count: a single block owns all rows.
    inputs = cpu_inputs(3, 1, CHUNK + 2, 4, torch.float64, seed=5)
    check_against_reference(inputs, True, 1e-10)


@pytest.mark.parametrize("everything", [True, False])
def test_gradcheck(everything):
    inputs = cpu_inputs(1, 2, CHUNK + 3, 3, torch.float64, D=everything, z=everything, delta_bias=everything,
                        softplus=everything, seed=6)
    leaves = [t.requires_grad_() if t is not None else None for t in as_args(inputs)]

    def fn(*args):
        return selective_scan(*args[:7], delta_bias=args[7], delta_softplus=everything, backend="cpu")

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_checkpoints_are_chunk_boundary_states():
    batch, d, L, n = 2, 3, 2 * CHUNK + 7, 4
    u, delta, A, B, C, D, z, bias = as_args(cpu_inputs(batch, d, L, n, torch.float64, seed=7))
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
    u, delta, A, B, C, _, _, _ = as_args(cpu_inputs(batch, d, L, n, dtype, D=False, z=False, delta_bias=False,
                                                    softplus=False))
    out, checkpoints = scan_cpu.forward(u, delta, A, B, C, None, None, None, False)
    assert out.shape == u.shape and out.dtype == dtype
    grads = scan_cpu.backward(torch.ones_like(out), u, delta, A, B, C, None, None, None, checkpoints, False)
    assert len(grads) == 8
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = grads
    assert dD is None and dz is None and ddelta_bias is None
    for grad, ref in ((du, u), (ddelta, delta), (dA, A), (dB, B), (dC, C)):
        assert grad.shape == ref.shape and grad.dtype == dtype


def test_noncontiguous_inputs_through_entry_point():
    u, delta, A, B, C, D, z, bias = as_args(cpu_inputs(2, 3, CHUNK + 5, 4, torch.float64, seed=8))
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


@pytest.mark.parametrize("d,n", [(2, 4), (16, 16)], ids=["per-row", "tiled"])
def test_extreme_decays_stay_finite(build, d, n):
    # Very large steps drive exp(dt*A) far below the fp32 range: the vectorised exp must give 0, not NaN.
    u, delta, A, B, C, D, z, bias = as_args(cpu_inputs(1, d, CHUNK + 1, n, torch.float32, seed=9))
    delta = delta.clone()
    delta[..., ::3] = 200.0  # softplus(200) = 200; dt*A down to ~ -1000
    out, _ = scan_cpu.forward(u, delta, A, B, C, D, z, bias, True)
    ref = selective_scan_reference(*(t.double() for t in (u, delta, A, B, C, D, z, bias)), delta_softplus=True)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
@pytest.mark.parametrize("softplus", [True, False])
def test_fused_step_prologue_matches_aten(dtype, rtol, softplus):
    """The forward kernel computes dt = softplus(delta + delta_bias) itself. Read it back exactly: with n = 1,
    B = C = u = 1 and a decay of 0 (A = -1e30), the output at step t is dt_t."""
    length = 4001
    delta = torch.linspace(-15.0, 40.0, length, dtype=dtype).reshape(1, 1, length)
    if not softplus:
        delta = delta.abs() + 0.01  # dt > 0, so that dt * A is a large negative number
    bias = torch.tensor([0.3], dtype=dtype)
    ones = torch.ones(1, 1, length, dtype=dtype)
    A = torch.full((1, 1), -1e30, dtype=dtype)
    out, _ = scan_cpu.forward(ones, delta, A, ones, ones, None, None, bias, softplus)
    # the backward's steps (scan_steps) are the forward's, bit for bit: its state recompute must match
    assert torch.equal(scan_cpu._ext().scan_steps(delta, bias, softplus), out)
    expected = delta + bias[:, None]
    if softplus:
        expected = torch.nn.functional.softplus(expected)  # threshold 20: identity above
    torch.testing.assert_close(out, expected, rtol=rtol, atol=0)


def _require_avx512():
    if not scan_cpu._ext().avx512_step_loop():
        pytest.skip("this build of the kernel has no AVX-512 step loop")


@pytest.fixture(scope="module")
def avx2_ext():
    """The kernel built without AVX-512, as AVX2-only CPUs run it (8-channel tiled forward, compiler-vectorised
    per-row loops): on an AVX-512 machine it would otherwise go untested. Where the native build is not an
    AVX-512 one, that build is already what this machine runs and the tests below cover it directly."""
    _require_avx512()
    with pytest.MonkeyPatch.context() as patch:  # built the way users ask for it: $EMAMBA_CPU_CFLAGS
        patch.setenv(scan_cpu.CFLAGS_ENV, "-mno-avx512f")
        patch.setattr(scan_cpu, "_module", None)
        module = scan_cpu._load()
    assert module.__name__ != scan_cpu._ext().__name__  # its own cache entry, beside the native build
    assert not module.avx512_step_loop()
    assert module.tile_lanes() == 8  # every AVX-512 CPU has AVX2 and FMA: the tiled forward, B/C read as rows
    return module


@pytest.fixture(params=["native", "avx2"])
def build(request, monkeypatch):
    """The kernel build under test, installed as scan_cpu's module so that the entry point runs it too."""
    if request.param == "native":
        return scan_cpu._ext()
    module = request.getfixturevalue("avx2_ext")
    monkeypatch.setattr(scan_cpu, "_module", module)
    return module


@pytest.mark.parametrize("vector", [False, True], ids=["generic", "vector"])
def test_fast_exp_accuracy_and_edges(build, vector):
    """The kernel's fp32 exp (decays, gates, softplus; and the SIMD one of the step loops, AVX-512 or AVX2):
    within 2e-7 relative of 2^(its own fp32 argument x * log2 e) over the whole normal range, within
    2e-7 + |x| * 1e-7 of exp(x) (the argument's fp32 rounding), exactly 1 at 0, and the documented edges:
    0 below, +inf on overflow, NaN through."""
    if vector and not build.tile_lanes():
        pytest.skip("this build of the kernel has no SIMD exp")
    fast_exp = lambda v: build.fast_exp(v, vector)  # noqa: E731
    x = torch.linspace(-87.0, 88.0, 2_000_001, dtype=torch.float32)
    y = fast_exp(x).double()
    arg = (x * 1.44269504088896341).double()  # fp32 product, as inside the kernel
    assert ((y - torch.exp2(arg)).abs() / torch.exp2(arg)).max().item() < 2e-7
    exact = torch.exp(x.double())
    assert (((y - exact).abs() / exact) <= 2e-7 + x.double().abs() * 1e-7).all()
    edges = torch.tensor([0.0, -89.0, -1e4, float("-inf"), 88.8, 1e4, float("nan")])
    expected = torch.tensor([1.0, 0.0, 0.0, 0.0, float("inf"), float("inf"), float("nan")])
    torch.testing.assert_close(fast_exp(edges), expected, equal_nan=True, rtol=0, atol=0)


def test_vector_exp_against_generic(build):
    """The step loops' SIMD exp against the generic one. The AVX2 one is the same arithmetic on 8 lanes: bit for
    bit. The AVX-512 one reduces x = floor(x) + r, r in [0, 1), with vreduceps, which rounds r downwards where
    the generic exp rounds x - round(x) to nearest, and has its own polynomial: within 3e-7 of it wherever both
    are normal, 0 below 2^-126 (the generic exp gives denormals down to 2^-126.5), the true value, not inf, in
    [127.5, 128) of its argument. Inside one build a row's forward and the backward's recompute take the same
    exp (forward_tiles, forward_chunk_avx512, backward_chunk_avx512 and chunk_decays with n % 16 == 0 all
    take exp2_avx512), so the states stay bit-identical (see the tiled-forward tests below)."""
    if not build.tile_lanes():
        pytest.skip("this build of the kernel has no SIMD exp")
    x = torch.cat([torch.linspace(-90.0, 88.3, 1_000_003), (torch.randn(100_000) * 30).clamp(max=88.3),
                   torch.tensor([0.0, -0.0, -87.3, -87.4, -87.6, -87.7, -88.0, float("-inf"), float("nan")])])
    vector, generic = build.fast_exp(x, True), build.fast_exp(x, False)
    near_max = torch.tensor([88.4, 88.7])  # x log2(e) in [127.5, 128)
    if not build.avx512_step_loop():
        assert torch.equal(vector.nan_to_num(7.0), generic.nan_to_num(7.0))
        assert torch.equal(build.fast_exp(near_max, True), build.fast_exp(near_max, False))
        return
    tiny = torch.finfo(torch.float32).tiny  # 2^-126
    normal = generic >= tiny
    assert ((vector[normal] - generic[normal]).abs() / generic[normal]).max().item() < 3e-7
    assert (vector[~normal & ~generic.isnan()] == 0).all() and vector[generic.isnan()].isnan().all()
    assert vector[x == 0].eq(1).all()
    torch.testing.assert_close(build.fast_exp(near_max, True).double(), near_max.double().exp(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("d,n", [(3, 8), (3, 16), (3, 64), (8, 8), (16, 16), (32, 64)])
def test_forward_reads_both_bc_layouts(build, d, n):
    """scan_fwd takes B, C as (batch, n, L) rows (unit stride along L, any batch/state strides: the mixer's
    slices of x_proj's output) or as a transposed view of (batch, L, n) memory; both give the same bits (per-row
    and, with d and n multiples of W, tiled loop), and any other layout is refused with a message naming the
    tensor."""
    ext = build
    batch, L = 2, 2 * CHUNK + 9
    u, delta, A, B, C, D, z, bias = as_args(cpu_inputs(batch, d, L, n, torch.float32, seed=11))
    proj = torch.randn(batch, 5 + 2 * n, L)  # (batch, dt_rank + 2n, L), as x_proj writes it
    proj[:, 5:5 + n], proj[:, 5 + n:] = B, C
    B_rows, C_rows = proj[:, 5:5 + n], proj[:, 5 + n:]
    assert not B_rows.is_contiguous() and B_rows.stride(2) == 1
    B_steps, C_steps = (X.transpose(1, 2).contiguous().transpose(1, 2) for X in (B, C))
    out_rows, ck_rows = ext.scan_fwd(u, delta, A, B_rows, C_rows, D, z, bias, True)
    out_steps, ck_steps = ext.scan_fwd(u, delta, A, B_steps, C_steps, D, z, bias, True)
    assert torch.equal(out_rows, out_steps) and torch.equal(ck_rows, ck_steps)
    ref = selective_scan_reference(*(t.double() for t in (u, delta, A, B, C, D, z, bias)), delta_softplus=True)
    assert rel_err(out_rows, ref) < 1e-4
    with pytest.raises(RuntimeError, match="C must have unit stride along L"):
        ext.scan_fwd(u, delta, A, B, torch.randn(batch, n, 2 * L)[..., ::2], D, z, bias, True)
    with pytest.raises(RuntimeError, match=r"B must be \(batch, n, L\)"):
        ext.scan_fwd(u, delta, A, B[:, :, :-1], C, D, z, bias, True)


@pytest.mark.parametrize("d,n", [(4, 16), (4, 64), (16, 16), (16, 64)])
def test_avx2_build_matches_avx512_build(avx2_ext, d, n):
    """Forward (per-row loops with d = 4, tiled with d = 16) and backward of the two builds: the same results
    to fp32 rounding (the loops sum in different orders)."""
    native = scan_cpu._ext()
    batch, L = 2, 2 * CHUNK + 9
    u, delta, A, B, C, D, z, bias = as_args(cpu_inputs(batch, d, L, n, torch.float32, seed=12))
    dout = torch.randn(batch, d, L, generator=torch.Generator().manual_seed(3))
    Bt, Ct = (X.transpose(1, 2).contiguous() for X in (B, C))  # (batch, L, n): the backward's layout
    results = {}
    for name, ext in (("avx2", avx2_ext), ("avx512", native)):
        assert ext.tiled_forward(d, n) == (d == 16)
        out, ck = ext.scan_fwd(u, delta, A, B, C, D, z, bias, True)
        steps = ext.scan_steps(delta, bias, True)
        results[name] = (out, ck, *ext.scan_bwd(dout, u, steps, A, Bt, Ct, D, z, ck))
    ref = selective_scan_reference(*(t.double() for t in (u, delta, A, B, C, D, z, bias)), delta_softplus=True)
    assert rel_err(results["avx2"][0], ref) < 1e-4
    for a, b in zip(results["avx2"], results["avx512"]):
        assert rel_err(a, b.double()) < 1e-5


# ---- the tiled forward (W = 16 channels per tile with AVX-512, 8 with AVX2; one per SIMD lane): d and n
# multiples of W. Every test runs on the native build and, on an AVX-512 machine, on the AVX2 build too. ----

def _require_tiled(build):
    if not build.tile_lanes():
        pytest.skip("this build of the kernel has no tiled forward")
    return build.tile_lanes()


@pytest.mark.parametrize("with_D,with_z,with_bias,softplus", FLAGS)
def test_tiled_forward_all_options(build, with_D, with_z, with_bias, softplus):
    """Values and gradients through the entry point (the tiled loop reads the mixer's B, C rows in place)."""
    _require_tiled(build)
    inputs = cpu_inputs(2, 32, 2 * CHUNK + 5, 16, D=with_D, z=with_z, delta_bias=with_bias, softplus=softplus,
                        seed=13)
    check_against_reference(inputs, softplus, 1e-4)


@pytest.mark.parametrize("n", [8, 16, 32, 64, 128])
def test_tiled_forward_state_sizes(build, n):
    lanes = _require_tiled(build)
    assert build.tiled_forward(16, n) == (n % lanes == 0)  # n = 8 with AVX-512: the per-row loop
    check_against_reference(cpu_inputs(1, 16, CHUNK + 9, n, seed=n), True, 1e-4)


@pytest.mark.parametrize("L", [1, 7, 9, 15, 17, CHUNK, 3 * CHUNK + 1])
def test_tiled_forward_lengths(build, L):
    # short chunks: the last W-step block of a chunk is partly past its end
    _require_tiled(build)
    check_against_reference(cpu_inputs(2, 16, L, 16, seed=L), True, 1e-4)


@pytest.mark.parametrize("n", [16, 64])
def test_tiled_and_per_row_forward_agree(build, n):
    """The same 48 channels by the tiled loop (d = 48) and by the per-row loop (one more channel, d = 49, so
    d is no multiple of W): the states, hence the checkpoints the backward starts from, are bit-identical;
    y = C.h is summed in another order, so the outputs agree to fp32 rounding. The tiled result does not
    depend on the thread count."""
    _require_tiled(build)
    assert build.tiled_forward(48, n) and not build.tiled_forward(49, n)
    u, delta, A, B, C, D, z, bias = as_args(cpu_inputs(3, 49, 2 * CHUNK + 9, n, seed=14))
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            runs.append(build.scan_fwd(u[:, :48].contiguous(), delta[:, :48].contiguous(), A[:48], B, C, D[:48],
                                       z[:, :48].contiguous(), bias[:48], True))
        out_rows, ck_rows = build.scan_fwd(u, delta, A, B, C, D, z, bias, True)
    finally:
        torch.set_num_threads(before)
    (tiled, ck_tiled), (tiled2, ck_tiled2) = runs
    assert torch.equal(tiled, tiled2) and torch.equal(ck_tiled, ck_tiled2)
    assert torch.equal(ck_tiled, ck_rows[:, :48])
    assert rel_err(tiled, out_rows[:, :48].double()) < 1e-6
    ref = selective_scan_reference(*(t.double() for t in (u, delta, A, B, C, D, z, bias)), delta_softplus=True)
    assert rel_err(tiled, ref[:, :48]) < 1e-4


def test_portable_build_fallback_warns(monkeypatch):
    """When the tuned (-march=native, OpenMP) build fails, the portable one is used and the user is told why."""
    import torch.utils.cpp_extension as cpp_extension

    class Portable:
        @staticmethod
        def chunk_size():
            return CHUNK

    def fake_load(name, **kwargs):
        if "-march=native" in kwargs["extra_cflags"]:
            raise RuntimeError("error: unrecognized command-line option '-march=native'")
        return Portable()

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(scan_cpu, "_module", None)
    with pytest.warns(RuntimeWarning, match=r"portable CPU scan build.*unrecognized command-line option"):
        assert isinstance(scan_cpu._load(), Portable)


@pytest.mark.parametrize("d,n,dtype", [(3, 5, torch.float32), (3, 16, torch.float32), (32, 64, torch.float32),
                                       (3, 8, torch.float64)], ids=["run-time-n", "per-row", "tiled", "fp64"])
def test_forward_without_checkpoints(build, d, n, dtype):
    """save_checkpoints=False (inference) gives the same output bits and an empty checkpoint tensor."""
    u, delta, A, B, C, D, z, bias = as_args(cpu_inputs(2, d, 2 * CHUNK + 9, n, dtype, seed=15))
    out, ck = scan_cpu.forward(u, delta, A, B, C, D, z, bias, True)
    out_nock, no_ck = scan_cpu.forward(u, delta, A, B, C, D, z, bias, True, save_checkpoints=False)
    assert torch.equal(out, out_nock)
    assert ck.shape == scan_cpu.checkpoint_shape(2, d, 2 * CHUNK + 9, n) and no_ck.numel() == 0


def test_entry_point_skips_checkpoints_only_without_grad(monkeypatch):
    """selective_scan saves checkpoints exactly when a backward can follow (grad mode on and an input that
    requires grad), and both paths give the same output."""
    calls = record_save_checkpoints(monkeypatch, scan_cpu)
    inputs = cpu_inputs(1, 16, CHUNK + 3, 16, seed=17)
    args = dict(inputs, delta_softplus=True, backend="cpu")
    y_plain = selective_scan(**args)  # nothing requires grad
    with torch.no_grad():
        y_nograd = selective_scan(**dict(args, A=inputs["A"].clone().requires_grad_()))
    y_grad = selective_scan(**dict(args, A=inputs["A"].clone().requires_grad_()))
    assert calls == [False, False, True]
    assert torch.equal(y_plain, y_nograd) and torch.equal(y_plain, y_grad) and y_grad.requires_grad


def test_build_name_separates_checkouts_and_flags(tmp_path, monkeypatch):
    """One cache entry per (flags, source text, source path, interpreter): two checkouts sharing a name made
    ninja rebuild the kernel whenever the other one had loaded it last."""
    tag, cflags, ldflags = scan_cpu.build_attempts()[0]
    name = scan_cpu._build_name(tag, cflags, ldflags)
    assert name == scan_cpu._build_name(tag, list(cflags), list(ldflags)) and name.startswith(f"emamba_scan_cpu_{tag}_")
    assert scan_cpu._build_name(tag, cflags + ["-DX"], ldflags) != name
    copy = tmp_path / "csrc" / "selective_scan_cpu.cpp"
    copy.parent.mkdir()
    copy.write_bytes(open(scan_cpu._SOURCE, "rb").read())  # the same text in another checkout
    monkeypatch.setattr(scan_cpu, "_SOURCE", str(copy))
    other = scan_cpu._build_name(tag, cflags, ldflags)
    assert other != name
    copy.write_bytes(copy.read_bytes() + b"\n// edited\n")
    assert scan_cpu._build_name(tag, cflags, ldflags) not in (name, other)
