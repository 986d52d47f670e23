#!/usr/bin/env bash
# GPU check of the Triton kernels: the selective scan (emamba.ops.scan_triton) and the causal conv1d + SiLU
# (emamba.ops.conv_triton). Needs one CUDA GPU; < 5 min.
#
#   1. prints the GPU,
#   2. runs the Triton correctness tests on CUDA (tests/ops/test_scan_triton.py, tests/ops/test_conv_triton.py),
#   3. checks the default tile configuration at realistic shapes against the pure-PyTorch chunked scan,
#   4. times forward and forward+backward of the triton scan, unsegmented (the default) and with automatic
#      time segments (FWD_SEGMENTS=None: "triton-seg"), and of mamba_ssm's selective_scan_fn when it
#      is importable, at EMamba-S-like shapes: median of 7 runs with CUDA events; reports the achieved
#      GB/s against the minimum bytes the scan must move and the exp2 rate against the SFU limit,
#   5. checks the conv kernels with their default tiles and times them against F.conv1d + F.silu (cuDNN).
#
# Usage: bash benchmarks/gpu_check.sh        (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
SM_CLOCK_MHZ="$(nvidia-smi --query-gpu=clocks.max.sm --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc '0-9')"
export SM_CLOCK_MHZ="${SM_CLOCK_MHZ:-1755}"
"$PY" - <<'EOF'
import torch, triton
assert torch.cuda.is_available(), "no CUDA device visible"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, triton {triton.__version__}, {p.name}, {p.multi_processor_count} SMs, "
      f"cc {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
EOF

echo
echo "== correctness tests (CUDA, compiled kernels)"
status=0
timeout 120 "$PY" -m pytest tests/ops/test_scan_triton.py tests/ops/test_conv_triton.py -q -p no:cacheprovider \
    || status=$?
echo "pytest exit status: $status"

echo
echo "== default tiles at realistic shapes vs the pure-PyTorch scan, then throughput"
bench_status=0
timeout 130 "$PY" - <<'EOF' || bench_status=$?
import os, sys
sys.path.insert(0, "benchmarks")  # cuda_timing
import torch
from emamba.ops import scan_triton
from emamba.ops.scan_reference import selective_scan_torch
import cuda_timing

dev = "cuda"
props = torch.cuda.get_device_properties(0)
clock_hz = float(os.environ.get("SM_CLOCK_MHZ", "1755")) * 1e6
exp_limit = props.multi_processor_count * 16 * clock_hz  # MUFU.EX2 results per second (16 / clk / SM)
DRAM_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
peak_bw = next((v for k, v in DRAM_BW.items() if k in props.name), None)

def inputs(batch, d, L, n, seed=0, grad=False):
    g = torch.Generator(device=dev).manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=dev) * scale)
    t = dict(u=r(batch, d, L), delta=r(batch, d, L, scale=0.5) - 1.0, A=-torch.exp(r(d, n, scale=0.5)),
             B=r(batch, n, L), C=r(batch, n, L), D=r(d), z=r(batch, d, L), delta_bias=r(d, scale=0.3))
    if grad:
        t = {k: v.requires_grad_(True) for k, v in t.items()}
    return t

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# -- sanity with the default configuration (the pytest run uses shrunken tiles) --------------------------
def with_segments(fn, value):
    """Run fn with scan_triton.FWD_SEGMENTS = value (1: the default unsegmented forward; None: automatic)."""
    def run():
        old = scan_triton.FWD_SEGMENTS
        scan_triton.FWD_SEGMENTS = value
        try:
            return fn()
        finally:
            scan_triton.FWD_SEGMENTS = old
    return run

# (2, 40, 3136, 64) has 6 programs and 49 chunks: the automatic choice takes 12 segments of 4-5 chunks
for (batch, d, L, n) in [(2, 40, 200, 64), (2, 96, 784, 16), (3, 48, 49, 64), (2, 40, 3136, 64)]:
    t = inputs(batch, d, L, n, seed=1, grad=True)
    ref = selective_scan_torch(**{k: v.double() for k, v in t.items()}, delta_softplus=True)
    dout = torch.randn_like(ref)
    gref = torch.autograd.grad(ref, [t[k] for k in NAMES], dout)
    args = [t[k].detach() for k in NAMES]
    for segments in (1, None):
        out, ck = with_segments(lambda: scan_triton.forward(*args, True), segments)()
        grads = scan_triton.backward(dout.float(), *args, ck, True)
        errs = {"out": ((out - ref).abs().max() / ref.abs().max()).item()}
        for k, g, gr in zip(NAMES, grads, gref):
            errs["d" + k] = ((g.double() - gr).abs().max() / gr.abs().max()).item()
        worst = max(errs.values())
        print(f"sanity b={batch} d={d} L={L} n={n} FWD_SEGMENTS={segments}: worst rel err {worst:.2e} "
              f"({max(errs, key=errs.get)}) -> {'OK' if worst < 1e-3 else 'MISMATCH'}")

# -- throughput ------------------------------------------------------------------------------------------
try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception as exc:  # not installed / broken build
    selective_scan_fn = None
    print(f"mamba_ssm not importable ({type(exc).__name__}); timing the triton scan only")

def median_ms(fn):
    return cuda_timing.median_ms(fn, runs=7, warmup=2)

# EMamba-S-like stages: (batch, d_inner, L = H*W, n)
SHAPES = [(8, 256, 3136, 64), (8, 512, 784, 64), (8, 1024, 196, 64), (8, 1792, 49, 64),
          (64, 256, 3136, 64), (64, 1792, 49, 64)]
print(f"{'shape (b, d, L, n)':>24} {'impl':>10} {'fwd ms':>8} {'fwd GB/s':>9} {'fwd+bwd ms':>11} "
      f"{'bwd GB/s':>9} {'fwd Gexp/s':>10}")
for (batch, d, L, n) in SHAPES:
    t = inputs(batch, d, L, n)
    args = [t[k] for k in NAMES]
    bdl, bnl = batch * d * L, batch * n * L
    fwd_bytes = 4 * (3 * bdl + 2 * bnl + bdl)  # read u, delta, z, B, C; write y
    bwd_bytes = fwd_bytes - 4 * bdl + 4 * (bdl + 3 * bdl + 2 * bnl)  # + read dout; write du, ddelta, dz, dB, dC
    elems = bdl * n
    impls = {}
    dout = torch.randn_like(t["u"])

    def tri_fwd():
        return scan_triton.forward(*args, True)

    def tri_both():
        out, ck = scan_triton.forward(*args, True)
        return scan_triton.backward(dout, *args, ck, True)

    impls["triton"] = (tri_fwd, tri_both)
    impls["triton-seg"] = (with_segments(tri_fwd, None), with_segments(tri_both, None))  # automatic segments
    if selective_scan_fn is not None:
        leaves = [a.detach().clone().requires_grad_(True) for a in args]

        def ms_fwd():
            with torch.no_grad():
                return selective_scan_fn(*leaves[:5], leaves[5], leaves[6], leaves[7], delta_softplus=True)

        def ms_both():
            out = selective_scan_fn(*leaves[:5], leaves[5], leaves[6], leaves[7], delta_softplus=True)
            return torch.autograd.grad(out, leaves, dout)

        impls["mamba_ssm"] = (ms_fwd, ms_both)
    for name, (f, fb) in impls.items():
        try:
            tf = median_ms(f)
            tb = median_ms(fb)
        except Exception as exc:
            print(f"{str((batch, d, L, n)):>24} {name:>10} failed: {type(exc).__name__}: {exc}")
            continue
        bwd_only = max(tb - tf, 1e-6)
        print(f"{str((batch, d, L, n)):>24} {name:>10} {tf:8.3f} {fwd_bytes / tf / 1e6:9.1f} {tb:11.3f} "
              f"{bwd_bytes / bwd_only / 1e6:9.1f} {elems / tf / 1e6:10.1f}")
    del t, args, dout
    torch.cuda.empty_cache()

print(f"\nlimits on this GPU: exp2 (SFU) {exp_limit / 1e9:.0f} Gexp/s at {clock_hz / 1e9:.2f} GHz"
      + (f", DRAM ~{peak_bw / 1e9:.0f} GB/s" if peak_bw else ""))
print("GB/s = minimum bytes (fp32: fwd reads u, delta, z, B, C and writes y; bwd also reads dout and writes "
      "du, ddelta, dz, dB, dC) / time; bwd time = (fwd+bwd) - fwd. At n = 64 every (b, d, t, n) element "
      "needs one exp, so 'fwd Gexp/s' against the SFU limit is the more telling efficiency.")
print(f"tiles: CHUNK_SIZE={scan_triton.CHUNK_SIZE}, FWD_STEPS={scan_triton.FWD_STEPS}, FWD_SEGMENTS={scan_triton.FWD_SEGMENTS} (triton-seg: None), "
      f"BLOCK_D auto (cap fwd {scan_triton._FWD_TILE}//next_pow2(n), bwd {scan_triton._BWD_MAX_BLOCK_D})")
EOF
echo
echo "== causal conv1d + SiLU: default tiles vs the formula, then triton vs F.conv1d + F.silu"
conv_status=0
timeout 45 "$PY" - <<'EOF' || conv_status=$?
import sys
sys.path.insert(0, "benchmarks")  # cuda_timing
import torch
from emamba.ops import conv_triton
from emamba.ops.causal_conv1d import causal_conv1d_silu_reference
import cuda_timing

dev = "cuda"

def median_ms(fn):
    return cuda_timing.median_ms(fn, runs=9, warmup=3)

print(f"tiles: BLOCK_D={conv_triton.BLOCK_D}, BLOCK_L={conv_triton.BLOCK_L}, num_warps={conv_triton.NUM_WARPS}")
print(f"{'shape (b, d, L)':>18} {'dtype':>9} {'max rel err':>11} {'tri fwd ms':>10} {'torch fwd ms':>12} {'fwd x':>6} "
      f"{'tri f+b ms':>10} {'torch f+b ms':>12} {'f+b x':>6} {'fwd GB/s':>8}")
for (batch, d, L) in [(8, 256, 3136), (8, 512, 784), (8, 1024, 196), (8, 1792, 49), (64, 256, 3136)]:
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(batch, d, L, device=dev, dtype=dtype)
        w = torch.randn(d, 4, device=dev, dtype=dtype) * 0.5
        b = torch.randn(d, device=dev, dtype=dtype)
        dout = torch.randn_like(x)
        leaves = [t.double().requires_grad_(True) for t in (x, w, b)]
        ref = causal_conv1d_silu_reference(*leaves)
        ref_grads = torch.autograd.grad(ref, leaves, dout.double())
        got = [conv_triton.forward(x, w, b), *conv_triton.backward(dout, x, w, b)]
        err = max(((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, [ref, *ref_grads]))
        tl_leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]

        def torch_fwd():
            with torch.no_grad():
                return causal_conv1d_silu_reference(x, w, b)

        def torch_both():
            out = causal_conv1d_silu_reference(*tl_leaves)
            return torch.autograd.grad(out, tl_leaves, dout)

        def tri_both():
            conv_triton.forward(x, w, b)
            return conv_triton.backward(dout, x, w, b)

        tf, rf = median_ms(lambda: conv_triton.forward(x, w, b)), median_ms(torch_fwd)
        tb, rb = median_ms(tri_both), median_ms(torch_both)
        gbs = 2 * x.numel() * x.element_size() / tf / 1e6
        print(f"{str((batch, d, L)):>18} {str(dtype)[6:]:>9} {err:11.1e} {tf:10.3f} {rf:12.3f} {rf / tf:6.2f} "
              f"{tb:10.3f} {rb:12.3f} {rb / tb:6.2f} {gbs:8.0f}")
        del x, w, b, dout, leaves, ref, ref_grads, got, tl_leaves
        torch.cuda.empty_cache()
print("x = torch time / triton time (> 1: the triton kernel is faster); fwd GB/s = (read x + write out) / time")
EOF
echo
echo "pytest status $status, scan benchmark status $bench_status, conv status $conv_status"
exit $(( status != 0 || bench_status != 0 || conv_status != 0 ))
