"""Fused Triton kernels for the selective scan (forward and backward).

This is the ``triton`` backend of :func:`emamba.ops.selective_scan`, called through the
``emamba::selective_scan_fwd`` / ``emamba::selective_scan_bwd`` custom ops with contiguous tensors of one
dtype (float32; float64 also works). Semantics are mamba_ssm's ``selective_scan_fn``::

    delta' = softplus(delta + delta_bias)          (each step optional)
    h_t    = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t        (h_{-1} = 0)
    y_t    = C_t . h_t + D * u_t ;  out = y * silu(z)                   (when z is given)

Shapes: u, delta, z: (batch, d, L); A: (d, n); B, C: (batch, n, L); D, delta_bias: (d,).

Both kernels use the grid ``(cdiv(d, BLOCK_D), batch)``: one program owns ``BLOCK_D`` channels of one batch
element and walks the whole sequence in chunks of ``CHUNK_SIZE`` steps; the time axis is sequential inside a
program, so the grid is the only parallelism. Nothing of size (batch, d, L, n) is ever materialised.

Forward kernel (time-sequential, state in registers)
---------------------------------------------------
The state ``h`` is a ``(BLOCK_D, BLOCK_N)`` register tile (``BLOCK_N = next_pow2(n)``, padded states are
masked to zero). Per chunk:

1. coalesced ``(BLOCK_D, CHUNK)`` loads of u and delta; delta' (bias, softplus) and delta' * u are computed
   once per element and written to a small per-program scratch in global memory (``CHUNK * (3 BLOCK_D +
   2 BLOCK_N)`` floats, L1/L2-resident), together with the chunk of B and C transposed to
   ``(CHUNK, BLOCK_N)``; ``tl.debug_barrier()`` (the scratch is written and read by different threads);
2. the recurrence one step after the other (unrolled ``FWD_STEPS`` times): per step the program reads one
   column of delta' / delta' u and one contiguous row of B and C from the scratch (L1 hits), updates
   ``h = exp2(delta' A log2e) * h + delta' u B`` and reduces ``y_t = sum_n C h`` over the state axis; the
   y of ``FWD_STEPS`` steps are collected in registers and written to the scratch together;
3. coalesced epilogue (``+ D u``, ``* silu(z)``, store) and the chunk-end state ``h`` is stored to
   ``checkpoints[b, channels, chunk, :]`` (shape ``(batch, d, n_chunks, n)``, the tensor saved for backward).

Offline sm_90 compiles (ptxas, no GPU) give about 8.4 SASS instructions per (b, d, t, n) element in the
recurrence loop (one ``MUFU.EX2``, ~5 FMA-pipe ops, the in-warp reduction for y, the scratch loads) and
~100-140 registers without spills at BLOCK_D=16, 4 warps, n=64. In compiled fp32 kernels ``exp2`` is
``ex2.approx.ftz`` (inline PTX). (A chunked ``tl.associative_scan`` formulation of the forward measured
~30 instructions per element: Triton spreads the time axis over 16 lanes, so the scan is shuffle-bound.)

Segmented forward (``FWD_SEGMENTS``; off by default until timed on a GPU)
--------------------------------------------------------------------------
With few (batch x channel block) programs, e.g. EMamba-S stage 1 at batch 8 (128 programs on 132 SMs), the
sequential walk over time leaves most of the GPU idle. With ``FWD_SEGMENTS`` > 1 (or None: automatic, about
``_FWD_SEGMENT_PROGRAMS_PER_SM`` programs per SM) the chunks are split into segments and the grid gets a
third axis over them. Pass 1 (``STATE_ONLY``) runs every segment from h = 0 and stores only its end state
and the sum of its steps delta' (no C loads, no reduction over the states); the host then forms the state
entering each segment, ``h_in[s] = exp(A * sum delta'[s - 1]) h_in[s - 1] + h_end[s - 1]`` (a loop over the
few segments on (batch, d, n) tensors); pass 2 (``HAS_H0``) is the kernel above, started from ``h_in``.
Pass 1 costs about another forward's exps, so this trades ~1.6x the work for segments x the parallelism.
Outputs, checkpoints and the backward are tested against the reference under the interpreter; whether it
pays on a GPU is what ``benchmarks/gpu_check.sh`` measures (it times both settings).

Backward kernel (chunked parallel scans)
----------------------------------------
Chunks are processed right to left. Per chunk it loads ``(BLOCK_D, CHUNK)`` tiles of u / delta / z / dout
once, then loops over the ``n`` states; for state ``i`` it forms ``(BLOCK_D, CHUNK)`` tiles
``a = exp(delta' A_i)`` and ``x = delta' u B_i`` (the loads for state ``i + 1`` are issued first: manual
software pipelining) and runs two ``tl.associative_scan``\\ s along time:

* the forward recompute from the previous chunk's checkpoint, carrying ``(a, p, x_last)`` so that it yields
  ``p_t = a_t h_{t-1}`` exactly (no ``h_t - x_t`` cancellation); ``h_t = p_t + x_t``;
* the adjoint ``g_t = dL/dh_t = dy_t C_t + a_{t+1} g_{t+1}`` as a reverse scan carrying
  ``(beta, alpha, a_first)``: the factor ``a_{t+1}`` of the element to the right is deferred, so no tile has
  to be shifted along time (Triton has no cheap register shift). Triton's ``reverse=True`` scan calls
  ``combine(later_segment, earlier_segment)`` in the interpreter and in the GPU lowering alike.

The carry ``a_{t+1} g_{t+1}`` across a chunk's right edge goes through a double-buffered (by chunk parity)
``(batch, d, 2, n)`` scratch, written and read by the same program around a ``tl.debug_barrier()``. Then::

    dx_t = g_t :  dB_t += g_t delta'_t u_t,  du_t += delta'_t g_t B_t,  ddelta'_t += u_t g_t B_t
    da_t = g_t h_{t-1} :  ddelta'_t += A g_t p_t,  dA += delta'_t g_t p_t
    dC_t += dy_t h_t ;  dy = dout * silu(z) ;  dz = dout * y * silu'(z) ;  dD += dy u
    ddelta = ddelta' * sigmoid(delta + delta_bias) (softplus) ;  ddelta_bias = sum_{b,t} ddelta

Offline sm_90 compiles give ~100 SASS instructions per element (two scans, the reverse one costs a lane
reversal, plus cross-lane reductions and the dB/dC atomics), ~170 registers without spills at BLOCK_D=16,
8 warps: the backward is expected to be several times (~5-10x) slower than the forward.

Reductions
~~~~~~~~~~
* ``dB``/``dC`` (batch, n, L) sum over the channel blocks: each program first reduces over its ``BLOCK_D``
  channels in registers, then adds one ``(CHUNK,)`` row per state and chunk with a relaxed
  ``tl.atomic_add`` into a zero-initialised output. Atomics rather than a two-stage reduction because the
  latter would need a ``(batch, d / BLOCK_D, n, L)`` buffer, several times the size of B. Consequence: the
  fp32 summation order across channel blocks is not deterministic (run-to-run differences ~1e-7 relative).
* ``dA`` (d, n), ``dD`` and ``ddelta_bias`` (d,) sum over batch: each program accumulates partials for its
  own ``(batch, channel block)`` (``dA`` with contention-free atomics into a ``(batch, d, n)`` buffer, ``dD``
  and ``ddelta_bias`` in registers, stored once) and the sum over batch is a deterministic ``torch.sum``
  (two-stage reduction).

Performance expectations
~~~~~~~~~~~~~~~~~~~~~~~~
At n = 64 the scan is bound by instruction issue and the exponential, not by memory: it needs one exp per
(b, d, t, n) element, and H100's SFUs deliver 16 exp2 per clock per SM. For batch 8, d 256, L 3136 that is
4.1e8 exps, i.e. >= ~110 us, while reading u, delta, z, B, C and writing y (115 MB) takes ~35 us at 3.35 TB/s.
So no implementation (mamba_ssm's CUDA kernel included) can reach a large fraction of the DRAM roofline at
n = 64; the benchmark in ``benchmarks/gpu_check.sh`` reports both numbers.

Measured on an H200 (results/gpu/): the kernels reach 9-25% of the exp2 limit and 2-6% of the DRAM
roofline at the EMamba-S shapes. The grid (batch x channel blocks) is the only parallelism and time is
walked sequentially, so too few warps are resident to hide the recurrence's latency; a time-parallel
(chunked) forward is the known next step.

Running without a GPU
---------------------
With ``TRITON_INTERPRET=1`` the kernels run through Triton's interpreter on CPU tensors (numpy); this is how
the tests run on machines without CUDA. It is very slow: use tiny shapes and a small ``CHUNK_SIZE``. The
kernels are wrapped with ``triton.jit`` lazily at their first launch in a given mode, so setting
``TRITON_INTERPRET`` after this module was imported still takes effect.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

try:  # keep the module importable (and is_available() honest) where triton is missing
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as _exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = _exc

# --------------------------------------------------------------------------------------------------
# Tunables (module attributes, read at every call). CHUNK_SIZE fixes the checkpoint layout
# (checkpoint_shape), so it must not change between a forward and its backward. The others only affect
# speed; None means "choose from the problem size".
# --------------------------------------------------------------------------------------------------
CHUNK_SIZE = 64  # time steps per chunk (power of two): checkpoint interval and backward scan length
FWD_STEPS = 16  # time steps unrolled per iteration of the forward recurrence (power of two)
FWD_BLOCK_D: Optional[int] = None  # channels per program, forward (power of two)
BWD_BLOCK_D: Optional[int] = None  # channels per program, backward (power of two)
FWD_NUM_WARPS: Optional[int] = None
# Time segments of the forward (see "Segmented forward" in the module docstring): 1 = off (the default until
# it is timed on a GPU: benchmarks/gpu_check.sh compares both), N = up to N segments, None = automatic
# (enough segments for _FWD_SEGMENT_PROGRAMS_PER_SM programs per SM, each at least _MIN_SEGMENT_CHUNKS long).
FWD_SEGMENTS: Optional[int] = 1
BWD_NUM_WARPS: Optional[int] = None
# Automatic choice: the largest BLOCK_D (power of two, <= the cap) that still gives at least
# _*_PROGRAMS_PER_SM programs per SM, but not below _MIN_BLOCK_D; warps so that each thread holds about
# _*_ELEMS_PER_THREAD elements of the tile (forward: the (BLOCK_D, BLOCK_N) state; backward: the
# (BLOCK_D, CHUNK) time tile). The values come from a tile sweep on an H200 (benchmarks/gpu_tune.py,
# results/gpu/h200_tile_sweep.log) at the EMamba-S shapes, batch 32, n = 64: forward BLOCK_D 16 with 8 warps
# (1.08-1.45x over the earlier 2 programs / SM and 8 elements / thread), backward 2 warps (1.7-2.35x over 4).
_FWD_TILE = 1024  # forward cap: BLOCK_D * BLOCK_N <= _FWD_TILE (BLOCK_D = 16 at n = 64)
_BWD_MAX_BLOCK_D = 16
_MIN_BLOCK_D = 4
_FWD_PROGRAMS_PER_SM = 1
_BWD_PROGRAMS_PER_SM = 2
_FWD_ELEMS_PER_THREAD = 4
_FWD_SEGMENT_PROGRAMS_PER_SM = 4
_MIN_SEGMENT_CHUNKS = 4
_BWD_ELEMS_PER_THREAD = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def is_available() -> tuple[bool, str]:
    """(available, reason): triton importable and CUDA present, or the Triton interpreter enabled."""
    try:
        if _TRITON_IMPORT_ERROR is not None or triton is None:
            return False, f"triton is not importable: {_TRITON_IMPORT_ERROR}"
        if _interpreting():
            return True, "Triton interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly"
        try:
            has_cuda = bool(torch.cuda.is_available())
        except Exception:
            has_cuda = False
        if has_cuda:
            return True, f"triton {triton.__version__} on CUDA"
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU for testing)"
    except Exception as exc:  # never raise
        return False, f"{type(exc).__name__}: {exc}"


def _n_chunks(length: int) -> int:
    return -(-int(length) // int(CHUNK_SIZE))


def checkpoint_shape(batch: int, d: int, L: int, n: int) -> tuple:
    """Shape of the saved chunk-end states: (batch, d, cdiv(L, CHUNK_SIZE), n)."""
    return (int(batch), int(d), _n_chunks(L), int(n))


# --------------------------------------------------------------------------------------------------
# Kernels. They are plain functions here, wrapped with triton.jit lazily (see _kernels), and call no other
# jit function, not even tl.zeros / tl.sum (see _add): a compiled-mode JITFunction cannot be called from an
# interpreted kernel. The combine functions of the scans and reductions are jitted at import:
# associative_scan / reduce need jit functions in compiled mode and the interpreter calls their .fn.
# --------------------------------------------------------------------------------------------------

if triton is not None:
    # Sums use tl.reduce with triton's own add combine rather than tl.sum: tl.sum (like tl.zeros) is a jit
    # function of triton.language, created in the mode that was active when triton was first imported (torch
    # imports it early), so it cannot run inside an interpreted kernel if TRITON_INTERPRET was set later.
    # The interpreter has a numpy fast path for exactly this combine function.
    _add = getattr(tl.standard, "_sum_combine", None)
    if _add is None:  # pragma: no cover - other triton versions

        @triton.jit
        def _add(a, b):
            return a + b

    @triton.jit
    def _linear_combine(a_l, b_l, a_r, b_r):
        # (a, b) represents h -> a * h + b; first operand = earlier segment.
        return a_r * a_l, a_r * b_l + b_r

    @triton.jit
    def _shifted_combine(a_l, p_l, x_l, a_r, p_r, x_r):
        # A segment [i..j] maps h_{i-1} to p_j = a_j h_{j-1} = A h_{i-1} + P; then h_j = p_j + x_last.
        # First operand = earlier segment.
        return a_r * a_l, a_r * (p_l + x_l) + p_r, x_r

    @triton.jit
    def _adjoint_combine(beta_r, alpha_r, a_r, beta_l, alpha_l, a_l):
        # Reverse scan: the FIRST operand is the later segment (the accumulated suffix), the second the
        # earlier one. A segment [t..s] maps v = a_{s+1} g_{s+1} to g_t = beta + alpha * v and carries
        # a_first = a_t, the factor that turns its g_t into the v of the segment to its left.
        m = alpha_l * a_r
        return beta_l + m * beta_r, m * alpha_r, a_l


def _scan_fwd_kernel(
    u_ptr, delta_ptr, A2_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, ckpt_ptr, scratch_ptr,
    seg_state_ptr, dtsum_ptr,
    d, L, n, n_chunks, chunks_per_seg,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FAST_EXP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    STEPS: tl.constexpr, BC_ROWS: tl.constexpr, STATE_ONLY: tl.constexpr, HAS_H0: tl.constexpr,
    SAVE_CKPT: tl.constexpr,
):
    # A2 = A * log2(e) (formed on the host), so that exp(delta' A) = exp2(delta' * A2).
    # Program (channel block, batch element, time segment); the segment is chunks [c_begin, c_end).
    # STATE_ONLY (pass 1 of the segmented forward): run the segment from h = 0 and store only its end
    # state into seg_state_ptr and the sum of its steps delta' into dtsum_ptr (no y, no checkpoints).
    # HAS_H0 (pass 2): start from the state entering the segment, read from seg_state_ptr. Both use its
    # (batch, d, n_seg, n) layout. SAVE_CKPT false (inference: no backward follows): no checkpoints written.
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    n_seg = tl.num_programs(2)
    c_begin = pid_s * chunks_per_seg
    c_end = tl.minimum(c_begin + chunks_per_seg, n_chunks)
    dtype = u_ptr.dtype.element_ty

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    offs_t = tl.arange(0, CHUNK)
    offs_s = tl.arange(0, STEPS)
    rloc = tl.arange(0, BLOCK_D)
    rows = (pid_b * d + offs_d) * L  # start of each (b, channel) row of u / delta / z / out
    bc_base = pid_b * n * L  # start of B[b] / C[b]
    offs_bn = tl.arange(0, BC_ROWS)
    ckpt_rows = (pid_b * d + offs_d) * n_chunks * n
    state_mask = mask_d[:, None] & mask_n[None, :]
    # this program's scratch for one chunk: delta', delta' * u and y as (BLOCK_D, CHUNK) and B, C transposed
    # to (CHUNK, BLOCK_N), so that every step reads contiguous rows (L1-resident; see the module docstring)
    prog = (pid_s * tl.num_programs(1) + pid_b) * tl.num_programs(0) + pid_d
    s_base = scratch_ptr + prog * (3 * BLOCK_D * CHUNK + 2 * CHUNK * BLOCK_N)
    s_dt = s_base + rloc * CHUNK
    s_dtu = s_dt + BLOCK_D * CHUNK
    s_y = s_dtu + BLOCK_D * CHUNK
    s_b = s_base + 3 * BLOCK_D * CHUNK
    s_c = s_b + CHUNK * BLOCK_N

    a2 = tl.load(A2_ptr + offs_d[:, None] * n + offs_n[None, :], mask=state_mask, other=0.0)
    if HAS_D:
        d_skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)

    seg_rows = ((pid_b * d + offs_d) * n_seg + pid_s) * n  # this segment's row of seg_state_ptr
    if HAS_H0:
        h = tl.load(seg_state_ptr + seg_rows[:, None] + offs_n[None, :], mask=state_mask, other=0.0)
    else:
        h = tl.full((BLOCK_D, BLOCK_N), 0.0, dtype)
    if STATE_ONLY:
        dt_total = tl.full((BLOCK_D,), 0.0, dtype)
    for c in range(c_begin, c_end):
        # 1. coalesced (BLOCK_D, CHUNK) tiles: delta' and delta' * u, computed once per element
        t = c * CHUNK + offs_t
        mask = mask_d[:, None] & (t < L)[None, :]
        ptrs = rows[:, None] + t[None, :]
        uu = tl.load(u_ptr + ptrs, mask=mask, other=0.0)
        dt = tl.load(delta_ptr + ptrs, mask=mask, other=0.0)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            # softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(e) = log(w) * e / (w - 1), w = 1 + e
            e = tl.exp(-tl.abs(dt))
            w = 1.0 + e
            dt = tl.maximum(dt, 0.0) + tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        dt = tl.where(mask, dt, 0.0)  # padded steps: delta' = 0, i.e. identity steps
        tl.store(s_dt[:, None] + offs_t[None, :], dt)
        tl.store(s_dtu[:, None] + offs_t[None, :], dt * uu)
        if STATE_ONLY:
            dt_total += tl.reduce(dt, 1, _add)
        # B / C: in slabs of BC_ROWS states, so that the prologue does not dominate the register budget
        for n0 in range(0, BLOCK_N, BC_ROWS):
            sn = n0 + offs_bn
            bc_mask = (sn < n)[:, None] & (t < L)[None, :]
            bc_ptrs = bc_base + sn[:, None] * L + t[None, :]
            bc_tile = sn[:, None] + offs_t[None, :] * BLOCK_N  # transposed positions in s_b / s_c
            tl.store(s_b + bc_tile, tl.load(B_ptr + bc_ptrs, mask=bc_mask, other=0.0))
            if not STATE_ONLY:
                tl.store(s_c + bc_tile, tl.load(C_ptr + bc_ptrs, mask=bc_mask, other=0.0))
        tl.debug_barrier()

        # 2. the recurrence, one time step after the other (unrolled by STEPS); STATE_ONLY needs no y, so
        # neither C nor the reduction over the states
        for j0 in range(0, CHUNK, STEPS):
            # y of these STEPS steps is collected in registers and stored once (one layout conversion
            # per STEPS steps instead of one per step)
            if not STATE_ONLY:
                y_blk = tl.full((BLOCK_D, STEPS), 0.0, dtype)
            for jj in tl.static_range(STEPS):
                j = j0 + jj
                dt_j = tl.load(s_dt + j)
                dtu_j = tl.load(s_dtu + j)
                b_j = tl.load(s_b + j * BLOCK_N + offs_n)
                if not STATE_ONLY:
                    c_j = tl.load(s_c + j * BLOCK_N + offs_n)
                arg = dt_j[:, None] * a2
                if FAST_EXP:
                    decay = tl.inline_asm_elementwise(
                        "ex2.approx.ftz.f32 $0, $1;", "=r,r", [arg], dtype=tl.float32, is_pure=True, pack=1
                    )
                else:
                    decay = tl.exp2(arg)
                h = decay * h + dtu_j[:, None] * b_j[None, :]
                if not STATE_ONLY:
                    y_j = tl.reduce(h * c_j[None, :], 1, _add)
                    y_blk = tl.where(offs_s[None, :] == jj, y_j[:, None], y_blk)
            if not STATE_ONLY:
                tl.store(s_y[:, None] + j0 + offs_s[None, :], y_blk)
        tl.debug_barrier()  # (also: the next chunk's prologue overwrites the scratch this loop reads)

        if not STATE_ONLY:
            # 3. coalesced epilogue: skip connection, gate, store; chunk-end state to the checkpoints
            y = tl.load(s_y[:, None] + offs_t[None, :])
            if HAS_D:
                # u is reloaded (an L1/L2 hit) rather than kept live in registers across the recurrence
                y += tl.load(u_ptr + ptrs, mask=mask, other=0.0) * d_skip[:, None]
            if HAS_Z:
                zz = tl.load(z_ptr + ptrs, mask=mask, other=0.0)
                y = y * (zz / (1.0 + tl.exp(-zz)))
            tl.store(out_ptr + ptrs, y.to(dtype), mask=mask)
            if SAVE_CKPT:
                tl.store(ckpt_ptr + ckpt_rows[:, None] + c * n + offs_n[None, :], h.to(dtype), mask=state_mask)
    if STATE_ONLY:
        tl.store(seg_state_ptr + seg_rows[:, None] + offs_n[None, :], h, mask=state_mask)
        tl.store(dtsum_ptr + (pid_b * d + offs_d) * n_seg + pid_s, dt_total, mask=mask_d)


def _scan_bwd_kernel(
    dout_ptr, u_ptr, delta_ptr, A_ptr, A2_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, carry_ptr,
    d, L, n, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FAST_EXP: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    dtype = u_ptr.dtype.element_ty

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    offs_t = tl.arange(0, CHUNK)
    rows = (pid_b * d + offs_d) * L
    bc_base = pid_b * n * L
    ckpt_rows = (pid_b * d + offs_d) * n_chunks * n
    part_rows = (pid_b * d + offs_d) * n  # rows of the (batch, d, n) dA partials
    carry_rows = (pid_b * d + offs_d) * 2 * n  # rows of the (batch, d, 2, n) adjoint carry buffer
    first_col = offs_t[None, :] == 0

    if HAS_D:
        d_skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)

    ones = tl.full((BLOCK_D, CHUNK), 1.0, dtype)
    zeros = tl.full((BLOCK_D, CHUNK), 0.0, dtype)
    dD_acc = tl.full((BLOCK_D,), 0.0, dtype)
    dbias_acc = tl.full((BLOCK_D,), 0.0, dtype)

    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        t = c * CHUNK + offs_t
        mask_t = t < L
        mask = mask_d[:, None] & mask_t[None, :]
        ptrs = rows[:, None] + t[None, :]
        uu = tl.load(u_ptr + ptrs, mask=mask, other=0.0)
        dt_pre = tl.load(delta_ptr + ptrs, mask=mask, other=0.0)
        g_out = tl.load(dout_ptr + ptrs, mask=mask, other=0.0)
        if HAS_BIAS:
            dt_pre = dt_pre + bias[:, None]
        if SOFTPLUS:
            e = tl.exp(-tl.abs(dt_pre))
            w = 1.0 + e
            dt = tl.maximum(dt_pre, 0.0) + tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        else:
            dt = dt_pre
        dt = tl.where(mask, dt, 0.0)
        dtu = dt * uu
        if HAS_Z:
            zz = tl.load(z_ptr + ptrs, mask=mask, other=0.0)
            sig_z = 1.0 / (1.0 + tl.exp(-zz))
            dy = g_out * (zz * sig_z)
            y = tl.full((BLOCK_D, CHUNK), 0.0, dtype)
        else:
            dy = g_out
        gB = tl.full((BLOCK_D, CHUNK), 0.0, dtype)  # sum_n g * B
        gpA = tl.full((BLOCK_D, CHUNK), 0.0, dtype)  # sum_n g * a * h_prev * A

        bc_offs = bc_base + tl.broadcast_to(t[None, :], (BLOCK_D, CHUNK))
        bc_mask = tl.broadcast_to(mask_t[None, :], (BLOCK_D, CHUNK))
        h_in = ckpt_ptr + ckpt_rows + (c - 1) * n
        h_in_mask = mask_d & (c > 0)
        # adjoint carry a_{t+1} g_{t+1} across the chunk's right edge; double-buffered by chunk parity so
        # that a chunk never overwrites what it is still reading
        v_in = carry_ptr + carry_rows + ((c + 1) % 2) * n
        v_in_mask = mask_d & (cc > 0)
        v_out = carry_ptr + carry_rows + (c % 2) * n
        a_nx = tl.load(A_ptr + offs_d * n, mask=mask_d, other=0.0)
        a2_nx = tl.load(A2_ptr + offs_d * n, mask=mask_d, other=0.0)
        b_nx = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0)
        c_nx = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0)
        h0_nx = tl.load(h_in, mask=h_in_mask, other=0.0)
        v_nx = tl.load(v_in, mask=v_in_mask, other=0.0)
        for i in range(n):
            a_i = a_nx
            a2_i = a2_nx
            b_i = b_nx
            c_i = c_nx
            h0 = h0_nx
            v_i = v_nx
            has_next = i + 1 < n
            a_nx = tl.load(A_ptr + offs_d * n + (i + 1), mask=mask_d & has_next, other=0.0)
            a2_nx = tl.load(A2_ptr + offs_d * n + (i + 1), mask=mask_d & has_next, other=0.0)
            b_nx = tl.load(B_ptr + bc_offs + (i + 1) * L, mask=bc_mask & has_next, other=0.0)
            c_nx = tl.load(C_ptr + bc_offs + (i + 1) * L, mask=bc_mask & has_next, other=0.0)
            h0_nx = tl.load(h_in + (i + 1), mask=h_in_mask & has_next, other=0.0)
            v_nx = tl.load(v_in + (i + 1), mask=v_in_mask & has_next, other=0.0)

            # recompute the chunk's states: p_t = a_t h_{t-1}, h_t = p_t + x_t
            arg = dt * a2_i[:, None]
            if FAST_EXP:
                decay = tl.inline_asm_elementwise(
                    "ex2.approx.ftz.f32 $0, $1;", "=r,r", [arg], dtype=tl.float32, is_pure=True, pack=1
                )
            else:
                decay = tl.exp2(arg)
            drive = dtu * b_i
            decay_cum, p_cum, _x = tl.associative_scan(
                (decay, zeros, drive), axis=1, combine_fn=_shifted_combine
            )
            p = p_cum + decay_cum * h0[:, None]
            hs = p + drive
            if HAS_Z:
                y += hs * c_i

            # adjoint: g_t = dy_t C_t + a_{t+1} g_{t+1}, where a_{end+1} g_{end+1} = v_i
            beta, alpha, _a = tl.associative_scan(
                (dy * c_i, ones, decay), axis=1, combine_fn=_adjoint_combine, reverse=True
            )
            g = beta + alpha * v_i[:, None]
            v_new = tl.reduce(tl.where(first_col, decay * g, 0.0), 1, _add)
            tl.store(v_out + i, v_new.to(dtype), mask=mask_d)

            # dB / dC: reduce over this block's channels, then one atomic row per program
            row = bc_base + i * L + t
            tl.atomic_add(dC_ptr + row, tl.reduce(dy * hs, 0, _add).to(dtype), mask=mask_t, sem="relaxed")
            tl.atomic_add(dB_ptr + row, tl.reduce(g * dtu, 0, _add).to(dtype), mask=mask_t, sem="relaxed")

            gB += g * b_i
            gp = g * p
            gpA += gp * a_i[:, None]
            # dA partial of this (batch, channel block): private addresses, so no contention
            dA_i = tl.reduce(gp * dt, 1, _add)
            tl.atomic_add(dA_ptr + part_rows + i, dA_i.to(dtype), mask=mask_d, sem="relaxed")

        ddt = gB * uu + gpA
        du = gB * dt
        if HAS_D:
            du += dy * d_skip[:, None]
            dD_acc += tl.reduce(dy * uu, 1, _add)
        if HAS_Z:
            if HAS_D:
                y += uu * d_skip[:, None]
            dz = g_out * y * (sig_z * (1.0 + zz * (1.0 - sig_z)))
            tl.store(dz_ptr + ptrs, dz.to(dtype), mask=mask)
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-dt_pre))
        ddt = tl.where(mask, ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.reduce(ddt, 1, _add)
        tl.store(du_ptr + ptrs, du.to(dtype), mask=mask)
        tl.store(ddelta_ptr + ptrs, ddt.to(dtype), mask=mask)
        # the next (earlier) chunk reads the carries stored above by other threads of this program
        tl.debug_barrier()

    if HAS_D:
        tl.store(dD_ptr + pid_b * d + offs_d, dD_acc.to(dtype), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * d + offs_d, dbias_acc.to(dtype), mask=mask_d)


_KERNEL_CACHE: dict = {}


def jit_kernels(fns: tuple, interpret: bool) -> tuple:
    """The plain kernel functions ``fns`` wrapped for the given mode (compiled JIT or interpreter), cached.

    Wrapping at the first launch in a mode, not at import, is what lets ``TRITON_INTERPRET`` set after
    import take effect (see the module docstring); :mod:`emamba.ops.conv_triton` uses it too.
    """
    key = (fns, interpret)
    if key not in _KERNEL_CACHE:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            from triton.runtime.jit import JITFunction as wrap
        _KERNEL_CACHE[key] = tuple(wrap(fn) for fn in fns)
    return _KERNEL_CACHE[key]


def _kernels(interpret: bool):
    """(forward, backward) scan kernels for the given mode."""
    return jit_kernels((_scan_fwd_kernel, _scan_bwd_kernel), interpret)


# --------------------------------------------------------------------------------------------------
# Host wrappers.
# --------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634  # the kernels use exp2(delta' * A * log2(e)); A * log2(e) is formed here


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_properties(device).multi_processor_count
        except Exception:
            pass
    return 132


def _pick_block_d(override: Optional[int], cap: int, batch: int, d: int, device: torch.device,
                  programs_per_sm: int) -> int:
    if override is not None:
        return int(override)
    block = max(_MIN_BLOCK_D, min(cap, _next_pow2(d)))
    target = programs_per_sm * _sm_count(device)
    while block > _MIN_BLOCK_D and batch * (-(-d // block)) < target:
        block //= 2
    return block


def _pick_segments(override: Optional[int], n_chunks: int, programs: int, device: torch.device) -> int:
    """Time segments of the forward for ``programs`` (batch x channel blocks) programs per segment."""
    if override is not None:
        if int(override) < 1:
            raise ValueError(f"FWD_SEGMENTS must be >= 1 or None, got {override}")
        return max(1, min(int(override), n_chunks))
    wanted = -(-_FWD_SEGMENT_PROGRAMS_PER_SM * _sm_count(device) // programs)
    return max(1, min(wanted, n_chunks // _MIN_SEGMENT_CHUNKS))


def _fwd_tiles(block_d: int, block_n: int) -> dict:
    """The forward kernel's tile constexprs under the current tunables (also compiled offline by the tests)."""
    return dict(BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=CHUNK_SIZE, STEPS=min(FWD_STEPS, CHUNK_SIZE),
                BC_ROWS=max(1, min(block_n, 1024 // CHUNK_SIZE)))


def _num_warps(override: Optional[int], tile_elems: int, elems_per_thread: int) -> int:
    if override is not None:
        return int(override)
    return max(2, min(8, tile_elems // (32 * elems_per_thread)))


def _fast_exp(u: Tensor) -> bool:
    # ex2.approx.ftz through inline PTX: compiled fp32 kernels only (the interpreter cannot run inline asm)
    return u.dtype == torch.float32 and not _interpreting()


def _check(u: Tensor, tensors: dict) -> None:
    if u.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the triton scan supports float32/float64 tensors, got {u.dtype}")
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != u.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but u has {u.dtype}")
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}")
    if u.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the triton scan needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)")
    for name, value in (("CHUNK_SIZE", CHUNK_SIZE), ("FWD_STEPS", FWD_STEPS)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


def _or(t: Optional[Tensor], fallback: Tensor) -> Tensor:
    # absent optional inputs: any valid pointer (never dereferenced: the HAS_* flags are constexpr)
    return t if t is not None else fallback


def forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    save_checkpoints: bool = True,
) -> tuple[Tensor, Tensor]:
    """Returns (out, checkpoints): out like u; checkpoints (batch, d, n_chunks, n), the chunk-end states.
    Without ``save_checkpoints`` (no backward will run) an empty tensor, never allocated or written."""
    u, delta, A, B, C, D, z, delta_bias = map(_c, (u, delta, A, B, C, D, z, delta_bias))
    _check(u, {"delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias})
    batch, d, length = u.shape
    n = A.shape[1]
    out = torch.empty_like(u)
    ckpt = u.new_empty(checkpoint_shape(batch, d, length, n) if save_checkpoints else (0,))
    if u.numel() == 0 or n == 0:  # degenerate: no state, y = D u
        out.zero_()
        if D is not None:
            out += u * D[None, :, None]
        if z is not None:
            out *= torch.nn.functional.silu(z)
        return out, ckpt.zero_()
    block_n = _next_pow2(n)
    block_d = _pick_block_d(FWD_BLOCK_D, max(1, _FWD_TILE // block_n), batch, d, u.device, _FWD_PROGRAMS_PER_SM)
    n_chunks = _n_chunks(length)
    n_seg = _pick_segments(FWD_SEGMENTS, n_chunks, batch * -(-d // block_d), u.device)
    chunks_per_seg = -(-n_chunks // n_seg)
    n_seg = -(-n_chunks // chunks_per_seg)
    grid = (-(-d // block_d), batch, n_seg)
    scratch = u.new_empty(grid[0] * grid[1] * grid[2] * CHUNK_SIZE * (3 * block_d + 2 * block_n))
    fwd, _ = _kernels(_interpreting())
    common = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), FAST_EXP=_fast_exp(u), **_fwd_tiles(block_d, block_n),
        num_warps=_num_warps(FWD_NUM_WARPS, block_d * block_n, _FWD_ELEMS_PER_THREAD),
    )
    A2 = A * _LOG2E
    ckpt_arg = ckpt if save_checkpoints else u  # never dereferenced without SAVE_CKPT
    args = (u, delta, A2, B, C, _or(D, u), _or(z, u), _or(delta_bias, u), out, ckpt_arg, scratch)
    h0 = None
    if n_seg > 1:
        # pass 1: every segment from h = 0, its end state and the sum of its steps; then the states entering
        # the segments, sequentially over the (few) segments: h_in[s] = exp(A sum dt'[s-1]) h_in[s-1] + h_end[s-1]
        h_end = u.new_empty(batch, d, n_seg, n)
        dtsum = u.new_empty(batch, d, n_seg)
        fwd[grid](*args, h_end, dtsum, d, length, n, n_chunks, chunks_per_seg, STATE_ONLY=True, HAS_H0=False,
                  SAVE_CKPT=False, **common)
        seg_decay = torch.exp2(A2[None, :, None, :] * dtsum[..., None])
        h0 = torch.zeros_like(h_end)
        for seg in range(1, n_seg):
            h0[:, :, seg] = seg_decay[:, :, seg - 1] * h0[:, :, seg - 1] + h_end[:, :, seg - 1]
    # pass 2 (the only pass without segments): y, and the chunk-end states as checkpoints
    fwd[grid](*args, _or(h0, u), u, d, length, n, n_chunks, chunks_per_seg, STATE_ONLY=False,
              HAS_H0=h0 is not None, SAVE_CKPT=bool(save_checkpoints), **common)
    return out, ckpt


def backward(
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    checkpoints: Tensor,
    delta_softplus: bool,
):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) of sum(out * dout); None for absent inputs."""
    dout, u, delta, A, B, C, D, z, delta_bias, checkpoints = map(
        _c, (dout, u, delta, A, B, C, D, z, delta_bias, checkpoints)
    )
    _check(u, {"dout": dout, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z,
               "delta_bias": delta_bias, "checkpoints": checkpoints})
    batch, d, length = u.shape
    n = A.shape[1]
    if n == 0:
        raise ValueError("the triton scan backward needs n >= 1")
    expected = checkpoint_shape(batch, d, length, n)
    if tuple(checkpoints.shape) != expected:
        raise ValueError(
            f"checkpoints have shape {tuple(checkpoints.shape)}, expected {expected} "
            "(was CHUNK_SIZE changed between forward and backward?)"
        )
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dB = torch.zeros_like(B)  # atomics
    dC = torch.zeros_like(C)  # atomics
    dz = torch.empty_like(z) if z is not None else None
    dA_part = u.new_zeros(batch, d, n)  # contention-free atomics, then summed over batch
    dD_part = u.new_empty(batch, d) if D is not None else None
    dbias_part = u.new_empty(batch, d) if delta_bias is not None else None
    carry = u.new_empty(batch, d, 2, n)  # adjoint carry between chunks, double-buffered
    block_d = _pick_block_d(BWD_BLOCK_D, _BWD_MAX_BLOCK_D, batch, d, u.device, _BWD_PROGRAMS_PER_SM)
    grid = (-(-d // block_d), batch)
    _, bwd = _kernels(_interpreting())
    bwd[grid](
        dout, u, delta, A, A * _LOG2E, B, C, _or(D, u), _or(z, u), _or(delta_bias, u), checkpoints,
        du, ddelta, dA_part, dB, dC, _or(dD_part, u), _or(dz, u), _or(dbias_part, u), carry,
        d, length, n, expected[2],
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), FAST_EXP=_fast_exp(u),
        BLOCK_D=block_d, CHUNK=CHUNK_SIZE,
        num_warps=_num_warps(BWD_NUM_WARPS, block_d * CHUNK_SIZE, _BWD_ELEMS_PER_THREAD),
    )
    dA = dA_part.sum(0)
    dD = dD_part.sum(0) if dD_part is not None else None
    ddelta_bias = dbias_part.sum(0) if dbias_part is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias
