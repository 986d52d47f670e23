"""Selective-scan backends at the EMamba-S stage shapes: time, peak memory, ratios and roofline.

Every (backend, shape, mode) runs in a fresh subprocess so that its peak memory is its own:
``peak extra`` = the process's peak resident memory (VmHWM, reset with freed memory handed back to the OS;
see ``emamba.memory``) during one extra call after the timed ones, minus its resident memory just before
it (inputs already allocated). The times are taken before that, with glibc's default allocator
behaviour: handing memory back makes every large allocation page-fault, which once inflated the
reference loop's times by up to 100x. On CUDA it is
``max_memory_allocated`` minus the memory allocated before the timed calls. Times are medians of ``--repeats`` runs after one warm-up.

Ratios are ``time(baseline) / time(backend)`` against the sequential ``reference`` loop and against
mambapy's Blelloch ``pscan`` (when ``pip install mambapy`` is present), measured in the same run.

Roofline: the minimum work of a scan is ``scan_flops`` (see ``emamba.flops``) and the minimum traffic is
reading u, delta, z, B, C once and writing y once (fwd+bwd: 3x the FLOPs; also read dout and write du,
ddelta, dz, dB, dC). The machine's FLOP/s is a large fp32 GEMM and its bandwidth a large tensor copy,
both measured at start-up; ``bound`` = max(flops / FLOP/s, bytes / bandwidth) and ``%roof`` =
bound / measured time.

That bound counts an exp as a few FLOPs at GEMM speed, which no CPU achieves. On CPU the table also prints
the **exp floor**: the batch * d * L * n decays exp(dt * A) a scan must evaluate (twice with the backward,
which recomputes them from the checkpoints) divided by the throughput of the fused kernel's own decay loop,
measured at start-up for each state size n on cache-resident operands (``decays_probe``, all threads);
``%exp`` = exp floor / measured time. A kernel that evaluates each decay with this exp cannot run below it.

    python benchmarks/scan.py                       # all shapes, all backends available here
    python benchmarks/scan.py --shapes s1 --repeats 5 --json results/scan_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {  # name: (batch, L, d, n) - d is the Mamba inner width (2 x stage width)
    "s1": (8, 3136, 128, 64),
    "s2": (8, 784, 256, 64),
    "s3": (8, 196, 640, 64),
    "s4": (8, 49, 896, 64),
    "ts": (32, 96, 256, 16),
}


def min_bytes(batch: int, length: int, d: int, n: int, backward: bool, itemsize: int = 4) -> int:
    seq, state = batch * d * length, batch * n * length
    fwd = (3 * seq + 2 * state) + seq  # read u, delta, z, B, C; write y
    if not backward:
        return fwd * itemsize
    bwd = (4 * seq + 2 * state) + (3 * seq + 2 * state)  # read u, delta, z, dout, B, C; write 5 grads
    return (fwd + bwd) * itemsize


def min_flops(batch: int, length: int, d: int, n: int, backward: bool) -> int:
    from emamba.flops import scan_flops

    return scan_flops(batch, d, length, n) * (3 if backward else 1)


# --------------------------------------------------------------------------------------------- worker
def _mambapy_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """mambapy's parallel scan wrapped to selective_scan_fn semantics (it materialises (B, L, d, n))."""
    import torch.nn.functional as F
    from mambapy.pscan import pscan

    delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    x, dt = u.transpose(1, 2), delta.transpose(1, 2)  # (B, L, d)
    deltaA = (dt.unsqueeze(-1) * A).exp()
    BX = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(deltaA, BX)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3) + D * x
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


def make_step(backend: str, shape: str, mode: str, device: str):
    """One timed unit of work: the scan (``fwd``, under no_grad) or the scan, a sum and its backward
    (``fwd+bwd``), on the shape's seeded inputs (the same for every backend)."""
    import torch

    from emamba.ops import selective_scan

    batch, length, d, n = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)

    def rand(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device)

    inputs = dict(u=rand(batch, d, length), delta=rand(batch, d, length, scale=0.5),
                  A=-torch.exp(rand(d, n, scale=0.5)), B=rand(batch, n, length), C=rand(batch, n, length),
                  D=rand(d), z=rand(batch, d, length), delta_bias=rand(d, scale=0.3))
    backward = mode == "fwd+bwd"
    if backward:
        for v in inputs.values():
            v.requires_grad_(True)
    if backend == "mambapy":
        fn = lambda: _mambapy_scan(**inputs, delta_softplus=True)  # noqa: E731
    else:
        fn = lambda: selective_scan(**inputs, delta_softplus=True, backend=backend)  # noqa: E731

    def step():
        if backward:
            fn().sum().backward()
            for v in inputs.values():
                v.grad = None
        else:
            with torch.no_grad():
                fn()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def worker(backend: str, shape: str, mode: str, repeats: int, device: str) -> dict:
    import torch

    from emamba.memory import peak_bytes, reset_peak

    step = make_step(backend, shape, mode, device)
    step()  # warm-up (and the first-use kernel load)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    # Peak memory from one more call after the timed ones: on CPU, measuring it makes glibc hand freed
    # memory back to the OS (emamba.memory), and the page faults that follow slowed allocation-heavy
    # backends (reference, pscan) by up to 100x when the times were taken in that mode.
    base = reset_peak(device)
    step()
    peak = peak_bytes(device) - base
    return {"backend": backend, "shape": shape, "mode": mode, "median_s": statistics.median(times),
            "times_s": times, "peak_extra_mb": max(peak, 0) / 2**20, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------- driver
def _timed(fn, device: str, repeats: int = 5) -> float:
    """Median seconds of ``repeats`` calls of fn after one warm-up."""
    import torch

    fn()
    ts = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def machine_peaks(device: str) -> dict:
    """Measured fp32 GEMM FLOP/s and copy bandwidth (bytes read + written per second).

    On CPU the GEMM is the faster of ATen's matmul (MKL in the pip wheels) and oneDNN's: MKL takes its
    AVX2 code on AMD CPUs, so on an AVX-512 Zen 5 it measured 205 GFLOP/s against oneDNN's 447, and a
    roofline from MKL alone would have flattered every kernel by 2x there.
    """
    import torch

    a = torch.randn(2048, 2048, device=device)
    big = torch.empty(64 * 2**20 // 4, device=device)  # 64 MiB, well beyond the caches
    out = torch.empty_like(big)
    gemms = {"aten": _timed(lambda: a @ a, device)}
    if device == "cpu" and torch.backends.mkldnn.is_available():
        try:
            am = a.to_mkldnn()
            gemms["onednn"] = _timed(lambda: torch._C._nn.mkldnn_linear(am, am), device)
        except RuntimeError:  # a build without the op: ATen's figure stands
            pass
    best = min(gemms, key=gemms.get)
    copy = _timed(lambda: out.copy_(big), device)
    return {"flops_per_s": 2 * 2048**3 / gemms[best], "gemm_library": best,
            "gemm_flops_per_s": {k: 2 * 2048**3 / t for k, t in gemms.items()},
            "bytes_per_s": 2 * big.numel() * 4 / copy}


def exp_throughput(n: int) -> float | None:
    """Decays exp(dt * A) per second through the fused CPU kernel's own decay loop, all threads, on
    cache-resident operands (``decays_probe``), for state size n; None if the kernel is unavailable."""
    from emamba.ops import scan_cpu

    if not scan_cpu.is_available()[0]:
        return None
    probe = scan_cpu._ext().decays_probe
    count = 2**27  # ~30 ms on 2 cores
    return count / _timed(lambda: probe(count, n), "cpu")


def run_one(args, backend, shape, mode) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", backend, shape, mode, "--repeats", str(args.repeats),
           "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        print(f"  {backend:>10} {shape} {mode}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: every available backend for the device, plus mambapy if installed")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per (backend, shape, mode)")
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--worker", nargs=3, metavar=("BACKEND", "SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.backends and "mambapy" in args.backends and importlib.util.find_spec("mambapy") is None:
        parser.error("--backends mambapy needs the mambapy package (pip install mambapy)")

    if args.worker:
        print(json.dumps(worker(*args.worker, repeats=args.repeats, device=args.device)))
        return 0

    import torch

    from emamba.ops import available_backends

    if args.backends is None:
        local = [b for b in available_backends() if (b in ("reference", "torch", "cpu")) == (args.device == "cpu")
                 or b in ("reference", "torch")]
        args.backends = local
        try:
            import mambapy  # noqa: F401

            args.backends.append("mambapy")
        except ImportError:
            pass
    peaks = machine_peaks(args.device)
    # decay exps per second for each state size n in the run (CPU kernel only; see exp_throughput)
    rates = {n: exp_throughput(n) for n in sorted({SHAPES[s][3] for s in args.shapes})} if args.device == "cpu" else {}
    exp_rates = {n: r for n, r in rates.items() if r}
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        from emamba.benchmark import cpu_model
        from emamba.ops import scan_cpu

        device_name = cpu_model()
        if scan_cpu.is_available()[0]:  # the fused kernel's code path sets its speed (README, Performance)
            device_name += f", {scan_cpu.kernel_variant()} scan kernel"
    print(f"device: {device_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"GEMM {peaks['flops_per_s'] / 1e9:.1f} GFLOP/s ("
          + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks["gemm_flops_per_s"].items())
          + f"), copy {peaks['bytes_per_s'] / 1e9:.1f} GB/s, "
          + "".join(f"decay exps (n={n}) {r / 1e9:.2f} G/s, " for n, r in exp_rates.items())
          + f"median of {args.repeats}")
    results = []
    for shape in args.shapes:
        batch, length, d, n = SHAPES[shape]
        for mode in args.modes:
            rows = {}
            for backend in args.backends:
                r = run_one(args, backend, shape, mode)
                if r is not None:
                    rows[backend] = r
            backward = mode == "fwd+bwd"
            flops, nbytes = min_flops(batch, length, d, n, backward), min_bytes(batch, length, d, n, backward)
            bound = max(flops / peaks["flops_per_s"], nbytes / peaks["bytes_per_s"])
            # decays exp(dt * A): batch * d * L * n, evaluated again by the backward's state recompute
            exp_rate = exp_rates.get(n)
            exp_floor = (2 if backward else 1) * batch * d * length * n / exp_rate if exp_rate else None
            print(f"\nshape {shape} (batch {batch}, L {length}, d {d}, n {n}) {mode}: "
                  f"min {flops / 1e9:.2f} GFLOP, {nbytes / 2**20:.0f} MiB -> bound {bound * 1e3:.2f} ms"
                  + (f"; exp floor {exp_floor * 1e3:.2f} ms" if exp_floor else ""))
            print(f"  {'backend':>10} {'median ms':>10} {'peak MB':>9} {'x ref':>7} {'x pscan':>8} {'%roof':>6}"
                  + (f" {'%exp':>6}" if exp_floor else ""))
            for backend, r in rows.items():
                r.update(shape_dims=SHAPES[shape], min_flops=flops, min_bytes=nbytes, bound_s=bound,
                         roofline_fraction=bound / r["median_s"], exp_floor_s=exp_floor,
                         exp_floor_fraction=exp_floor / r["median_s"] if exp_floor else None,
                         exps_per_s=exp_rate, device=device_name, **peaks)
                vs_ref = rows["reference"]["median_s"] / r["median_s"] if "reference" in rows else float("nan")
                vs_ps = rows["mambapy"]["median_s"] / r["median_s"] if "mambapy" in rows else float("nan")
                r.update(speedup_vs_reference=vs_ref, speedup_vs_mambapy=vs_ps)
                print(f"  {backend:>10} {r['median_s'] * 1e3:>10.1f} {r['peak_extra_mb']:>9.0f} {vs_ref:>7.1f} "
                      f"{vs_ps:>8.1f} {100 * r['roofline_fraction']:>5.1f}%"
                      + (f" {100 * r['exp_floor_fraction']:>5.1f}%" if exp_floor else ""))
                results.append(r)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
