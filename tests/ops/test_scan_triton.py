"""The Triton selective-scan kernels (emamba.ops.scan_triton) against the sequential reference.

Without a CUDA device the kernels run through Triton's interpreter (TRITON_INTERPRET=1, numpy on CPU
tensors), which is slow: the shapes are tiny and the chunk / block sizes are shrunk so that the chunk
boundaries, the padded last chunk, several channel blocks and masked channels/states are all exercised.
With CUDA the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():
    # scan_triton reads this at every launch (its kernels also run in the interpreter when triton itself was
    # imported before the variable was set, as happens when torch or another test module imported it first)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from emamba.ops import scan_triton, selective_scan  # noqa: E402
from scan_inputs import NAMES, as_args, make_inputs, record_save_checkpoints, reference_grads, rel_err  # noqa: E402

scan_mod = importlib.import_module("emamba.ops.selective_scan")

AVAILABLE, REASON = scan_triton.is_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"triton scan unavailable: {REASON}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK = 8  # small chunks so that L = 19 spans three chunks, the last one padded
TUNABLES = ("CHUNK_SIZE", "FWD_STEPS", "FWD_BLOCK_D", "BWD_BLOCK_D", "FWD_SEGMENTS")
DEFAULTS = {name: getattr(scan_triton, name) for name in TUNABLES}  # before the fixture shrinks them


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(scan_triton, "CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(scan_triton, "FWD_STEPS", 4)
    monkeypatch.setattr(scan_triton, "FWD_BLOCK_D", 4)
    monkeypatch.setattr(scan_triton, "BWD_BLOCK_D", 4)


def check_close(name, got, want, tol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err <= tol, f"{name}: max abs error / max |ref| = {err:.3e} (tol {tol:g})"


def run_and_compare(batch, d, length, n, dtype=torch.float64, softplus=True, tol=1e-10, **opts):
    inputs = make_inputs(batch, d, length, n, dtype=dtype, device=DEVICE, **opts)
    args = as_args(inputs)
    out, ckpt = scan_triton.forward(*args, softplus)
    assert out.dtype == dtype and out.shape == inputs["u"].shape
    assert ckpt.dtype == dtype and tuple(ckpt.shape) == scan_triton.checkpoint_shape(batch, d, length, n)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dout = dout.to(device=DEVICE, dtype=dtype)
    ref_out, ref_grads = reference_grads(inputs, softplus, dout)
    check_close("out", out, ref_out, tol)
    grads = scan_triton.backward(dout, *args, ckpt, softplus)
    assert len(grads) == 8
    for name, got in zip(NAMES, grads):
        want = ref_grads[name]
        if want is None:
            assert got is None, f"d{name} should be None for an absent input"
        else:
            assert got.dtype == dtype, f"d{name} has dtype {got.dtype}"
            check_close(f"d{name}", got, want, tol)
    return inputs, out, ckpt


@pytest.mark.parametrize("length", [1, 7, CHUNK, 2 * CHUNK + 3])
def test_all_options_lengths(length):
    run_and_compare(2, 6, length, 4)  # d = 6: two channel blocks of 4, the second half masked


@pytest.mark.parametrize(
    "opts",
    [
        dict(z=False, D=False, delta_bias=False, softplus=False),
        dict(z=False, D=True, delta_bias=False, softplus=False),
        dict(z=True, D=False, delta_bias=False, softplus=True),
        dict(z=False, D=False, delta_bias=True, softplus=True),
        dict(z=True, D=True, delta_bias=True, softplus=False),
    ],
    ids=["plain", "D", "z+softplus", "bias+softplus", "z+D+bias"],
)
def test_optional_inputs(opts):
    run_and_compare(2, 4, 2 * CHUNK + 3, 4, **opts)


@pytest.mark.parametrize("n, d, length", [(3, 5, 11), (16, 4, CHUNK + 1)])
def test_state_sizes(n, d, length):
    run_and_compare(2, d, length, n)  # n = 3: padded (non power of two) states; d = 5: masked channels


def test_float32():
    run_and_compare(2, 6, 2 * CHUNK + 3, 4, dtype=torch.float32, tol=2e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-sized default tiles: too slow for the interpreter")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.float64, 1e-10)])
@pytest.mark.parametrize("batch, d, length, n", [(2, 40, 200, 64), (3, 24, 49, 16)])
def test_default_tiles_cuda(monkeypatch, batch, d, length, n, dtype, tol):
    for name, value in DEFAULTS.items():
        monkeypatch.setattr(scan_triton, name, value)
    run_and_compare(batch, d, length, n, dtype=dtype, tol=tol)


@pytest.mark.parametrize("segments, length", [(2, 2 * CHUNK + 3), (3, 2 * CHUNK + 3), (2, 4 * CHUNK), (8, 3 * CHUNK)])
def test_segmented_forward(monkeypatch, segments, length):
    """Time segments (pass 1: segment end states from zero, combined on the host; pass 2: y from the true
    entering states): outputs, checkpoints and the backward that reads them agree with the reference."""
    monkeypatch.setattr(scan_triton, "FWD_SEGMENTS", segments)
    run_and_compare(2, 6, length, 4)
    run_and_compare(2, 4, length, 3, z=False, D=False, delta_bias=False, softplus=False)


def test_segment_choice():
    cpu = torch.device("cpu")  # _sm_count falls back to 132 off CUDA
    assert scan_triton._pick_segments(1, 50, 128, cpu) == 1
    assert scan_triton._pick_segments(4, 3, 128, cpu) == 3  # never more segments than chunks
    with pytest.raises(ValueError, match="FWD_SEGMENTS"):
        scan_triton._pick_segments(0, 50, 128, cpu)
    # automatic: EMamba-S stage 1 at batch 8 (128 programs) wants ~4 programs per SM -> 5 segments of >= 4
    # chunks of its 49; stage 4 (L 49: one chunk) and large batches stay unsegmented
    assert scan_triton._pick_segments(None, 49, 128, cpu) == 5
    assert scan_triton._pick_segments(None, 1, 128, cpu) == 1
    assert scan_triton._pick_segments(None, 49, 4096, cpu) == 1


@pytest.mark.parametrize("segments", [1, 2])
def test_checkpoints_are_chunk_end_states(monkeypatch, segments):
    monkeypatch.setattr(scan_triton, "FWD_SEGMENTS", segments)
    batch, d, length, n = 1, 4, 2 * CHUNK + 3, 4
    inputs = make_inputs(batch, d, length, n, dtype=torch.float64, device=DEVICE, z=False, D=False)
    _, ckpt = scan_triton.forward(*as_args(inputs), True)
    delta = torch.nn.functional.softplus(inputs["delta"] + inputs["delta_bias"][None, :, None])
    h = torch.zeros(batch, d, n, dtype=torch.float64, device=DEVICE)
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * inputs["A"]) * h + (
            delta[:, :, t, None] * inputs["B"][:, None, :, t] * inputs["u"][:, :, t, None]
        )
        if (t + 1) % CHUNK == 0 or t == length - 1:
            check_close(f"checkpoint {t // CHUNK}", ckpt[:, :, t // CHUNK], h, 1e-12)


@pytest.mark.parametrize("segments", [1, 2])
def test_forward_without_checkpoints(monkeypatch, segments):
    """save_checkpoints=False (inference) gives the same output bits and an empty checkpoint tensor."""
    monkeypatch.setattr(scan_triton, "FWD_SEGMENTS", segments)
    args = as_args(make_inputs(2, 6, 2 * CHUNK + 3, 4, dtype=torch.float32, device=DEVICE))
    out, ckpt = scan_triton.forward(*args, True)
    out_nock, no_ckpt = scan_triton.forward(*args, True, save_checkpoints=False)
    assert torch.equal(out, out_nock)
    assert ckpt.numel() > 0 and no_ckpt.numel() == 0


def test_entry_point_skips_checkpoints_only_without_grad(monkeypatch):
    """selective_scan asks the Triton forward for checkpoints exactly when a backward can follow."""
    monkeypatch.delitem(scan_mod._availability, "triton", raising=False)
    calls = record_save_checkpoints(monkeypatch, scan_triton)
    inputs = make_inputs(1, 4, CHUNK + 3, 4, dtype=torch.float32, device=DEVICE)
    with torch.no_grad():
        out_infer = selective_scan(**inputs, delta_softplus=True, backend="triton")
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    out_train = selective_scan(**leaves, delta_softplus=True, backend="triton")
    assert calls == [False, True]
    assert torch.equal(out_infer, out_train.detach())


def test_through_public_entry_point(monkeypatch):
    # backend_status caches availability per process; another test module may have cached the triton
    # entry before TRITON_INTERPRET was set, so drop it for this test (monkeypatch restores it)
    monkeypatch.delitem(scan_mod._availability, "triton", raising=False)
    assert scan_mod.backend_status("triton")[0]
    inputs = make_inputs(2, 4, 2 * CHUNK + 3, 4, dtype=torch.float32, device=DEVICE)
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    out = selective_scan(**leaves, delta_softplus=True, backend="triton")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = torch.autograd.grad(out, [leaves[k] for k in NAMES], dout)
    ref_out, ref_grads = reference_grads(inputs, True, dout)
    check_close("out", out, ref_out, 2e-4)
    for name, got in zip(NAMES, grads):
        check_close(f"d{name}", got, ref_grads[name], 2e-4)


def test_fake_tensor_shapes_match():
    # the custom op's fake implementation (torch.compile tracing) must agree with the real checkpoints
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = make_inputs(2, 4, 2 * CHUNK + 3, 4, dtype=torch.float32, device=DEVICE)
    args = as_args(inputs)
    real_out, real_ckpt = scan_mod._fused_fwd(*args, True, "triton")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if a is not None else None for a in args]
        fake_out, fake_ckpt = scan_mod._fused_fwd(*fake_args, True, "triton")
    assert fake_out.shape == real_out.shape
    assert fake_ckpt.shape == real_ckpt.shape and fake_ckpt.dtype == real_ckpt.dtype


def test_rejects_bad_inputs():
    inputs = make_inputs(1, 4, 5, 4, dtype=torch.float32, device=DEVICE)
    args = as_args(inputs)
    with pytest.raises(TypeError):
        scan_triton.forward(*[a.half() if a is not None else None for a in args], True)
    _, ckpt = scan_triton.forward(*args, True)
    with pytest.raises(ValueError, match="checkpoints"):
        scan_triton.backward(torch.ones_like(args[0]), *args, ckpt[:, :, :0], True)


def test_is_available_contract():
    ok, reason = scan_triton.is_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert scan_triton.checkpoint_shape(3, 5, 2 * CHUNK + 1, 7) == (3, 5, 3, 7)


# (batch, d, L, n) -> (forward BLOCK_D, warps), (backward BLOCK_D, warps): the fastest correct configurations
# of the tile sweep on an H200 (132 SMs; benchmarks/gpu_tune.py, results/gpu/h200_tile_sweep.log)
SWEPT_BEST = {
    (32, 128, 3136, 64): ((16, 8), (8, 2)),
    (32, 640, 196, 64): ((16, 8), (16, 2)),  # backward: (8, 2) 2.96 ms was best, (16, 2) 3.20 ms
    (32, 256, 784, 64): ((16, 8), (16, 2)),
}


@pytest.mark.parametrize("shape", sorted(SWEPT_BEST))
def test_automatic_tiles_follow_the_gpu_sweep(shape):
    """The automatic BLOCK_D / num_warps choice (no overrides) at 132 SMs reproduces the measured choice."""
    batch, d, _, n = shape
    cpu = torch.device("cpu")  # _sm_count falls back to 132 (H100 / H200) off CUDA
    block_n = 1 << (n - 1).bit_length()
    fwd_block = scan_triton._pick_block_d(None, max(1, scan_triton._FWD_TILE // block_n), batch, d, cpu,
                                          scan_triton._FWD_PROGRAMS_PER_SM)
    fwd_warps = scan_triton._num_warps(None, fwd_block * block_n, scan_triton._FWD_ELEMS_PER_THREAD)
    bwd_block = scan_triton._pick_block_d(None, scan_triton._BWD_MAX_BLOCK_D, batch, d, cpu,
                                          scan_triton._BWD_PROGRAMS_PER_SM)
    bwd_warps = scan_triton._num_warps(None, bwd_block * 64, scan_triton._BWD_ELEMS_PER_THREAD)  # CHUNK_SIZE 64
    assert ((fwd_block, fwd_warps), (bwd_block, bwd_warps)) == SWEPT_BEST[shape]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the other tests compile the kernels for this GPU")
def test_default_kernels_compile_for_sm90_offline(monkeypatch):
    """Triton's compiler (not the interpreter) accepts both kernels as fp32 runs them on a GPU: default
    EMamba-S tiles (n = 64) and the inline-PTX exp2 that the interpreter cannot run."""
    from triton_offline import compile_for_sm90

    for name, value in DEFAULTS.items():  # undo the small_tiles fixture
        monkeypatch.setattr(scan_triton, name, value)
    chunk, n = scan_triton.CHUNK_SIZE, 64
    block_n = scan_triton._next_pow2(n)
    fwd_block_d, bwd_block_d = scan_triton._FWD_TILE // block_n, scan_triton._BWD_MAX_BLOCK_D
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, FAST_EXP=True)
    ints = {name: "i32" for name in ("d", "L", "n", "n_chunks")}
    fwd_ptrs = ("u", "delta", "A2", "B", "C", "D", "z", "bias", "out", "ckpt", "scratch", "seg_state", "dtsum")
    bwd_ptrs = ("dout", "u", "delta", "A", "A2", "B", "C", "D", "z", "bias", "ckpt", "du", "ddelta", "dA", "dB",
                "dC", "dD", "dz", "dbias", "carry")
    fwd = dict(kernel="_scan_fwd_kernel",
               signature={**{p + "_ptr": "*fp32" for p in fwd_ptrs}, **ints, "chunks_per_seg": "i32"},
               num_warps=scan_triton._num_warps(None, fwd_block_d * block_n, scan_triton._FWD_ELEMS_PER_THREAD))
    fwd_meta = dict(flags, **scan_triton._fwd_tiles(fwd_block_d, block_n))
    specs = [  # the forward unsegmented (training, inference), then the two passes of the segmented forward
        dict(fwd, constexprs=dict(fwd_meta, STATE_ONLY=False, HAS_H0=False, SAVE_CKPT=True)),
        dict(fwd, constexprs=dict(fwd_meta, STATE_ONLY=False, HAS_H0=False, SAVE_CKPT=False)),
        dict(fwd, constexprs=dict(fwd_meta, STATE_ONLY=True, HAS_H0=False, SAVE_CKPT=False)),
        dict(fwd, constexprs=dict(fwd_meta, STATE_ONLY=False, HAS_H0=True, SAVE_CKPT=True)),
        dict(kernel="_scan_bwd_kernel", signature={**{p + "_ptr": "*fp32" for p in bwd_ptrs}, **ints},
             constexprs=dict(flags, BLOCK_D=bwd_block_d, CHUNK=chunk),
             num_warps=scan_triton._num_warps(None, bwd_block_d * chunk, scan_triton._BWD_ELEMS_PER_THREAD)),
    ]
    proc = compile_for_sm90([dict(spec, module="emamba.ops.scan_triton") for spec in specs])
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "NO_PTXAS" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.stdout.count("COMPILED") == len(specs)
