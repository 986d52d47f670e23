"""``emamba benchmark``: inference or training throughput of one model, in the spirit of timm's benchmark.py.

Reports samples/s, ms per step, peak memory, parameters, GMACs (paper convention, see
:mod:`emamba.flops`) and the selective-scan backend that actually ran. ``--json`` prints one JSON object
as the last line. Times are medians over ``--num-bench-iter`` steps after ``--num-warm-iter`` warm-up
steps. A training step is forward, loss (cross-entropy on the class logits plus the token-label loss on
the aux logits when the model has that head), backward and an SGD update.

    emamba benchmark --model emamba_s --bench train --batch-size 4 --img-size 128 --backend auto --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emamba benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="emamba_s")
    p.add_argument("--bench", choices=["infer", "train"], default="infer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None, help="autocast dtype (scan and FFTs stay fp32)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="selective-scan backend (see `emamba.ops.BACKENDS`)")
    p.add_argument("--num-warm-iter", type=int, default=2)
    p.add_argument("--num-bench-iter", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def train_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Loss of a benchmark training step: cross-entropy on the class logits, plus 0.5 x the aux tokens'
    cross-entropy when the model returns token-labeling outputs ``(cls, aux, box)``."""
    if isinstance(out, tuple):
        cls_logits, aux_logits, _ = out
        return F.cross_entropy(cls_logits, target) + 0.5 * F.cross_entropy(
            aux_logits.flatten(0, 1), target.repeat_interleave(aux_logits.shape[1]))
    return F.cross_entropy(out, target)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    """The host CPU's model name (ratios measured on this project's VMs depend on it)."""
    from emamba.ops.projection import cpuinfo_field

    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def _scan_kernel(backend: str) -> Optional[str]:
    if backend != "cpu":
        return None
    from emamba.ops import scan_cpu

    return scan_cpu.kernel_variant()


def _projection_gemm(args: argparse.Namespace, backend: str) -> Optional[str]:
    """The GEMM engine of the Mamba projections in this run, "onednn" or "blas" (emamba.ops.projection); it
    sets their speed on AMD CPUs. The run's options decide the run-level half of the rule; the smallest
    projections keep BLAS in any case (the per-call half)."""
    if args.device != "cpu":
        return None
    from emamba.ops.projection import onednn_allowed

    allowed = onednn_allowed(
        backend, needs_grad=args.bench == "train", autocast=args.amp is not None, traced=args.compile
    )
    return "onednn" if allowed else "blas"


def run_benchmark(args: argparse.Namespace) -> dict:
    import timm

    import emamba  # noqa: F401  (registers the models)
    from emamba.flops import model_flops
    from emamba.memory import peak_bytes, reset_peak
    from emamba.models.emamba import check_image_size
    from emamba.ops import resolve_backend

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("emamba benchmark: --device cuda requested but no CUDA device is available")
    if args.model not in timm.list_models("emamba_*"):
        raise SystemExit(f"emamba benchmark: unknown model {args.model!r}; see `emamba models`")
    check_image_size(args.img_size, args.img_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backend = resolve_backend(args.backend, torch.device(args.device), torch.float32)

    model = timm.create_model(args.model, num_classes=args.num_classes, scan_backend=args.backend)
    params = sum(p.numel() for p in model.parameters())
    gmacs = model_flops(args.model, args.img_size, num_classes=args.num_classes).macs_paper / 1e9
    model.to(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    train = args.bench == "train"
    model.train(train)
    step_model = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch_size, model.in_chans, args.img_size, args.img_size, device=args.device)
    x = x.contiguous(memory_format=memory_format)
    target = torch.randint(args.num_classes, (args.batch_size,), device=args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None
    scaler = torch.amp.GradScaler(args.device) if train and args.amp == "fp16" else None
    autocast = torch.autocast(args.device, dtype=AMP_DTYPES[args.amp]) if args.amp else nullcontext()

    def step() -> None:
        if not train:
            with torch.no_grad(), autocast:
                step_model(x)
            return
        with autocast:
            loss = train_loss(step_model(x), target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    for _ in range(args.num_warm_iter):
        step()
    _sync(args.device)
    times = []
    for _ in range(args.num_bench_iter):
        start = time.perf_counter()
        step()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    # Peak memory from one more step, measured after the timed ones: on CPU the measurement makes glibc
    # return freed memory to the OS (see emamba.memory), which slows allocation-heavy code (many page
    # faults) and must not leak into the times.
    base = reset_peak(args.device)
    step()
    _sync(args.device)
    peak_mb = max(peak_bytes(args.device) - base, 0) / 2**20
    step_s = statistics.median(times)
    return {
        "model": args.model,
        "bench": args.bench,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        # the SIMD level of ATen's own CPU kernels (ATEN_CPU_CAPABILITY can cap it, e.g. at avx2)
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability() if args.device == "cpu" else None,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "backend": backend,
        # the fused CPU scan's code path ("avx512", "avx2" or "generic"), which sets its speed; None otherwise
        "scan_kernel": _scan_kernel(backend),
        "projection_gemm": _projection_gemm(args, backend),
        "samples_per_sec": args.batch_size / step_s,
        "step_ms": step_s * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "peak_mem_mb": peak_mb,
        "peak_mem_kind": "max_memory_allocated" if args.device == "cuda" else "resident set above baseline",
        "params": params,
        "gmacs_paper": gmacs,
    }


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_bench_iter < 1:
        raise SystemExit("emamba benchmark: --num-bench-iter must be at least 1")
    result = run_benchmark(args)
    print(f"{result['model']} {result['bench']} on {result['device']} ({result['threads']} threads), "
          f"batch {result['batch_size']} @ {result['img_size']}px, backend {result['backend']}"
          f"{' (' + result['scan_kernel'] + ' kernel)' if result['scan_kernel'] else ''}"
          f"{', projections ' + result['projection_gemm'] if result['projection_gemm'] else ''}, "
          f"amp {result['amp'] or 'off'}, compile {result['compile']}")
    print(f"  {result['samples_per_sec']:.2f} samples/s, {result['step_ms']:.1f} ms/step (median of "
          f"{args.num_bench_iter}), peak memory {result['peak_mem_mb']:.0f} MB, "
          f"{result['params'] / 1e6:.2f} M params, {result['gmacs_paper']:.2f} GMACs/sample")
    if args.json:
        print(json.dumps(result))
    return 0
