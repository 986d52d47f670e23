"""Tile sweep of the Triton selective scan at EMamba-S shapes (needs one CUDA GPU).

For each shape it times the default configuration, then every (BLOCK_D, num_warps[, FWD_STEPS]) of the
forward kernel and every (BLOCK_D, num_warps) of the backward kernel, each checked against the default
configuration's outputs/gradients (which `benchmarks/gpu_check.sh` checks against the fp64 reference).
Times are medians of 7 runs with CUDA events. It stops starting new measurements once --budget-s seconds
have passed, so it fits a short GPU lease; the best configuration per shape and its speed-up over the
default are printed at the end, and optionally where a train step of EMamba-S spends its GPU time.

    python benchmarks/gpu_tune.py --budget-s 170 [--profile]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from cuda_timing import median_ms  # benchmarks/ is on sys.path when this script runs
from emamba.ops import scan_triton

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# EMamba-S at batch 32 (d_inner = 2 x stage width, L = tokens per stage, n = 64) and the forecasting shape
SHAPES = [(32, 128, 3136, 64), (32, 256, 784, 64), (32, 640, 196, 64), (32, 256, 96, 16), (32, 896, 49, 64)]
FWD_GRID = [dict(FWD_BLOCK_D=bd, FWD_NUM_WARPS=w) for bd, w in itertools.product((2, 4, 8, 16), (1, 2, 4, 8))]
BWD_GRID = [dict(BWD_BLOCK_D=bd, BWD_NUM_WARPS=w) for bd, w in itertools.product((2, 4, 8, 16), (2, 4, 8))]
TUNABLES = ("CHUNK_SIZE", "FWD_STEPS", "FWD_BLOCK_D", "BWD_BLOCK_D", "FWD_NUM_WARPS", "BWD_NUM_WARPS")
DEFAULTS = {k: getattr(scan_triton, k) for k in TUNABLES}


def inputs(batch, d, L, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda") * scale  # noqa: E731
    return dict(u=r(batch, d, L), delta=r(batch, d, L, scale=0.5) - 1.0, A=-torch.exp(r(d, n, scale=0.5)),
                B=r(batch, n, L), C=r(batch, n, L), D=r(d), z=r(batch, d, L), delta_bias=r(d, scale=0.3))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def configure(**overrides):
    for k, v in DEFAULTS.items():
        setattr(scan_triton, k, v)
    for k, v in overrides.items():
        setattr(scan_triton, k, v)


def trial(kind, cfg, run, error, base_ms, best):
    """Check one configuration against the default's result, time it, print it; return the new best."""
    configure(**cfg)
    try:
        err = error(run())
        ms = median_ms(run)
    except Exception as exc:  # e.g. too many registers / shared memory for this tile
        print(f"  {kind} {cfg}: failed ({type(exc).__name__}: {str(exc)[:80]})")
        return best
    ok = err < 1e-4
    print(f"  {kind} {cfg}: {ms:.3f} ms ({base_ms / ms:.2f}x) err {err:.1e}{'' if ok else ' MISMATCH'}")
    return (ms, cfg) if ok and ms < best[0] else best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=170.0)
    p.add_argument("--profile", action="store_true", help="then profile one EMamba-S train step (batch 32, bf16)")
    args = p.parse_args()
    start = time.perf_counter()
    over = lambda: time.perf_counter() - start > args.budget_s  # noqa: E731
    print(f"{torch.cuda.get_device_name()}; defaults {DEFAULTS}")
    summary = []
    for shape in SHAPES:
        if over():
            print(f"budget spent: skipping {shape}")
            continue
        t = inputs(*shape)
        a = [t[k] for k in NAMES]
        dout = torch.randn_like(t["u"])
        configure()
        out0, ck0 = scan_triton.forward(*a, True)
        grads0 = scan_triton.backward(dout, *a, ck0, True)
        f0 = median_ms(lambda: scan_triton.forward(*a, True))
        b0 = median_ms(lambda: scan_triton.backward(dout, *a, ck0, True))
        print(f"\n{shape}: default fwd {f0:.3f} ms, bwd {b0:.3f} ms")
        best_f, best_b = (f0, {}), (b0, {})
        fwd = lambda: scan_triton.forward(*a, True)  # noqa: E731
        fwd_err = lambda r: rel(r[0], out0)  # noqa: E731
        for cfg in FWD_GRID:
            if over():
                break
            best_f = trial("fwd", cfg, fwd, fwd_err, f0, best_f)
        for steps in (8, 32):
            if over() or not best_f[1]:
                break
            best_f = trial("fwd", dict(best_f[1], FWD_STEPS=steps), fwd, fwd_err, f0, best_f)
        bwd = lambda: scan_triton.backward(dout, *a, ck0, True)  # noqa: E731
        bwd_err = lambda grads: max(rel(g, g0) for g, g0 in zip(grads, grads0))  # noqa: E731
        for cfg in BWD_GRID:
            if over():
                break
            best_b = trial("bwd", cfg, bwd, bwd_err, b0, best_b)
        summary.append((shape, f0, best_f, b0, best_b))
        del t, a, dout, out0, ck0, grads0
        torch.cuda.empty_cache()
    configure()
    print("\nbest per shape (speed-up over the default configuration):")
    for shape, f0, (fm, fc), b0, (bm, bc) in summary:
        print(f"  {shape}: fwd {f0:.3f} -> {fm:.3f} ms ({f0 / fm:.2f}x) {fc or 'default'}; "
              f"bwd {b0:.3f} -> {bm:.3f} ms ({b0 / bm:.2f}x) {bc or 'default'}")
    if args.profile and not over():
        profile_train_step()
    print(f"total {time.perf_counter() - start:.0f} s")


def profile_train_step():
    import timm
    from torch.profiler import ProfilerActivity, profile

    from emamba.benchmark import train_loss

    model = timm.create_model("emamba_s", num_classes=1000).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(32, 3, 224, 224, device="cuda")
    target = torch.randint(1000, (32,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = train_loss(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print("\nEMamba-S train step, batch 32, 224 px, bf16 autocast: CUDA kernels by total time")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
