"""Would oneDNN make the Mamba mixer's projections faster on CPU? (An alternative measured, not adopted.)

PyTorch's x86 wheels run fp32 GEMMs through MKL, which takes its AVX2 code on AMD CPUs; oneDNN's GEMM
runs AVX-512 there (benchmarks/scan.py prints both rates). The mixer's channels-first projections all go
through ``emamba.layers.mamba._bmm_weight`` (one batched GEMM over the expanded weight). This script swaps
that function for one ``torch.ops.mkldnn._linear_pointwise`` call per image and measures:

1. the GEMMs alone, at the shapes ``_bmm_weight`` receives in one forward of the model (recorded, not
   listed by hand): median time of each, the ratio, and the largest difference of the outputs;
2. the whole model's inference, both versions alternating within one process, ratio taken per round.

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


def onednn_bmm_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Same contract as ``_bmm_weight``: weight @ x[b] for each b, (batch, out, L), via oneDNN."""
    out = x.new_empty(x.shape[0], weight.shape[0], x.shape[2])
    for b in range(x.shape[0]):  # linear(a, w) = a @ w.T, so a = weight and w = x[b].T give weight @ x[b]
        out[b] = torch.ops.mkldnn._linear_pointwise(weight, x[b].t(), None, "none", [], "")
    return out


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(timed_ms(fn) for _ in range(repeats))


def recorded_shapes(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[tuple, tuple]]:
    """The distinct (weight, x) shapes ``_bmm_weight`` gets in one inference forward."""
    original, seen = mamba_layer._bmm_weight, []

    def recording(weight, x):
        key = (tuple(weight.shape), tuple(x.shape))
        if key not in seen:
            seen.append(key)
        return original(weight, x)

    mamba_layer._bmm_weight = recording
    try:
        with torch.no_grad():
            model(images)
    finally:
        mamba_layer._bmm_weight = original
    return seen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="emamba_s")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--gemm-repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=7, help="model rounds; each times both versions, best of 3")
    args = p.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    shapes = recorded_shapes(model, images)
    original = mamba_layer._bmm_weight

    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"== {threads} thread(s): GEMMs of _bmm_weight, batched GEMM (ATen/MKL) vs oneDNN per image")
        for w_shape, x_shape in shapes:
            weight, x = torch.randn(w_shape), torch.randn(x_shape)
            with torch.no_grad():
                t_bmm = median_ms(lambda: original(weight, x), args.gemm_repeats)
                t_dnn = median_ms(lambda: onednn_bmm_weight(weight, x), args.gemm_repeats)
                diff = (original(weight, x) - onednn_bmm_weight(weight, x)).abs().max().item()
            print(f"  weight {w_shape} x {x_shape}: bmm {t_bmm:.3f} ms, oneDNN {t_dnn:.3f} ms, "
                  f"{t_bmm / t_dnn:.2f}x, max |diff| {diff:.1e}")

        def forward_ms(fn) -> float:
            mamba_layer._bmm_weight = fn
            try:
                with torch.no_grad():
                    return min(timed_ms(lambda: model(images)) for _ in range(3))
            finally:
                mamba_layer._bmm_weight = original

        forward_ms(original), forward_ms(onednn_bmm_weight)  # warm-up, oneDNN primitive cache included
        ratios, t_old, t_new = [], [], []
        for _ in range(args.rounds):
            t_old.append(forward_ms(original))
            t_new.append(forward_ms(onednn_bmm_weight))
            ratios.append(t_old[-1] / t_new[-1])
        print(f"  {args.model} inference, batch {args.batch_size} @ {args.img_size} px: current "
              f"{statistics.median(t_old):.1f} ms, oneDNN {statistics.median(t_new):.1f} ms, ratio per round "
              f"median {statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
