"""oneDNN vs BLAS for the Mamba mixer's channels-first projections on CPU (emamba.ops.projection).

PyTorch's x86 wheels run fp32 GEMMs through MKL, which takes its AVX2 code on AMD CPUs; oneDNN's GEMM
runs AVX-512 there (benchmarks/scan.py prints both rates). The mixer's projections all go through
``emamba.ops.channels_first_linear``, whose engine ``set_cpu_gemm`` / ``EMAMBA_CPU_GEMM`` chooses
(``auto`` = oneDNN on AMD CPUs with AVX-512 at one thread). This script measures:

1. the GEMMs alone, at the shapes the model passes in one inference forward (recorded, not listed by
   hand): batched BLAS GEMM vs one oneDNN call per image vs one GEMM over the batch (L == 1 only), the
   path the shape rule picks, and the largest difference of the outputs;
2. the whole model's inference with the engine forced to ``blas`` and to ``onednn``, alternating within
   one process, ratio taken per round, and the time spent inside the projections per forward. (The
   L == 1 fold is on in both.)

    python benchmarks/onednn_projections.py --model emamba_s --batch-size 4 --img-size 128 --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import emamba  # noqa: F401  (registers the models)
import emamba.layers.mamba as mamba_layer
from emamba.ops import projection


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(timed_ms(fn) for _ in range(repeats))


def recorded_shapes(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[tuple, tuple]]:
    """The distinct (weight, x) shapes ``channels_first_linear`` gets in one inference forward."""
    original, seen = mamba_layer.channels_first_linear, []

    def recording(weight, x, backend="auto"):
        key = (tuple(weight.shape), tuple(x.shape))
        if key not in seen:
            seen.append(key)
        return original(weight, x, backend)

    mamba_layer.channels_first_linear = recording
    try:
        with torch.no_grad():
            model(images)
    finally:
        mamba_layer.channels_first_linear = original
    return seen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="emamba_s")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--gemm-repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=7, help="model rounds; each times both engines, best of 3")
    args = p.parse_args(argv)
    if not projection._onednn_usable():
        raise SystemExit("this PyTorch build has no oneDNN linear (torch.backends.mkldnn / mkldnn._linear_pointwise)")

    print(f"CPU vendor {projection.cpu_vendor()!r}, ATen capability {torch.backends.cpu.get_cpu_capability()}")
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    shapes = recorded_shapes(model, images)

    for threads in args.threads:
        torch.set_num_threads(threads)
        projection.set_cpu_gemm("auto")
        print(f"== {threads} thread(s), automatic engine {projection.cpu_gemm()}: projection GEMMs (ms, median "
              f"of {args.gemm_repeats})")
        projection.set_cpu_gemm("onednn")
        for w_shape, x_shape in shapes:
            weight, x = torch.randn(w_shape), torch.randn(x_shape)
            with torch.no_grad():
                path = projection.projection_path(weight, x)
                ref = projection.bmm_expanded(weight, x)
                t_bmm = median_ms(lambda: projection.bmm_expanded(weight, x), args.gemm_repeats)
                t_dnn = median_ms(lambda: projection.onednn_per_image(weight, x), args.gemm_repeats)
                line = f"  weight {w_shape} x {x_shape}: bmm {t_bmm:.3f}, oneDNN {t_dnn:.3f} ({t_bmm / t_dnn:.2f}x)"
                if x_shape[-1] == 1:
                    t_fold = median_ms(lambda: projection.fold_over_batch(weight, x), args.gemm_repeats)
                    line += f", fold {t_fold:.3f} ({t_bmm / t_fold:.2f}x)"
                diff = (projection.channels_first_linear(weight, x) - ref).abs().max().item()
            print(f"{line}; rule takes {path}, max |diff| vs bmm {diff:.1e}")

        projection_ms = {"blas": [], "onednn": []}  # time inside the projections, per forward

        def forward_ms(engine: str) -> float:
            projection.set_cpu_gemm(engine)
            original, inside = mamba_layer.channels_first_linear, [0.0]

            def timed_projection(weight, x, backend="auto"):
                start = time.perf_counter()
                out = original(weight, x, backend)
                inside[0] += time.perf_counter() - start
                return out

            mamba_layer.channels_first_linear = timed_projection
            try:
                with torch.no_grad():
                    best = min(timed_ms(lambda: model(images)) for _ in range(3))
            finally:
                mamba_layer.channels_first_linear = original
            projection_ms[engine].append(inside[0] * 1e3 / 3)
            return best

        forward_ms("blas"), forward_ms("onednn")  # warm-up, oneDNN primitive cache included
        projection_ms = {"blas": [], "onednn": []}
        ratios, t_old, t_new = [], [], []
        for _ in range(args.rounds):
            t_old.append(forward_ms("blas"))
            t_new.append(forward_ms("onednn"))
            ratios.append(t_old[-1] / t_new[-1])
        print(f"  {args.model} inference, batch {args.batch_size} @ {args.img_size} px: blas "
              f"{statistics.median(t_old):.1f} ms, oneDNN {statistics.median(t_new):.1f} ms, ratio per round "
              f"median {statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f}); "
              f"inside the projections {statistics.median(projection_ms['blas']):.1f} -> "
              f"{statistics.median(projection_ms['onednn']):.1f} ms per forward")
    projection.set_cpu_gemm(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
