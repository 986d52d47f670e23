"""Inference speed of an exported ONNX model (onnxruntime, CPU) against the same model in PyTorch.

The ONNX file holds the pure-PyTorch ``torch`` scan (chunked log-depth scan unrolled for the token count;
the fused scan op has no ONNX translation, see ``emamba.export``), so three timings are reported, all on
the same input, each the median of ``--repeats`` calls after one warm-up, alternating between engines:

* ``onnxruntime``: the exported file, ``CPUExecutionProvider``, ``--threads`` intra-op threads;
* ``torch, scan=torch``: the same algorithm in eager PyTorch (what the ONNX graph computes);
* ``torch, scan=auto``: eager PyTorch with the fused C++ scan (what ``emamba`` uses on CPU).

    python benchmarks/onnx_infer.py --model emamba_s --batch-size 4 --img-size 128 --json results/bench/onnx_infer.json

Needs ``onnx``, ``onnxscript`` and ``onnxruntime`` (the ``export`` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

import emamba  # noqa: F401  (registers the models)
from emamba.export import export_onnx, scan_backend


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="emamba_s")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--optimize", action="store_true", help="run onnxscript's optimizer (slow on full models)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args()
    try:
        import onnxruntime as ort
    except ImportError:
        p.error("needs onnxruntime: pip install -e '.[export]'")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.model}.onnx"
        summary = export_onnx(model, x, path, dynamic_batch=True, verify=True, optimize=args.optimize)
        print(f"exported in {summary['export_s']:.1f} s, {summary['size_mb']:.1f} MB, "
              f"max |onnx - torch| = {summary['max_abs_diff']:.2e}", flush=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}

        def run_torch(backend):
            def call():
                with scan_backend(model, backend), torch.inference_mode():
                    model(x)
            return call

        engines = {"onnxruntime": lambda: session.run(None, feed), "torch, scan=torch": run_torch("torch"),
                   "torch, scan=auto": run_torch("auto")}
        times: dict[str, list[float]] = {name: [] for name in engines}
        for fn in engines.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in engines.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(f"{args.model}, batch {args.batch_size} @ {args.img_size}px, {args.threads} threads, "
          f"median of {args.repeats} (ms):")
    for name, ms in medians.items():
        print(f"  {name:18s} {ms:9.1f}   ({medians['torch, scan=auto'] / ms:.2f}x the eager auto model)")
    result = {"model": args.model, "batch_size": args.batch_size, "img_size": args.img_size,
              "threads": args.threads, "repeats": args.repeats, "optimized": args.optimize,
              "export_s": summary["export_s"], "size_mb": summary["size_mb"],
              "max_abs_diff": summary["max_abs_diff"], "median_ms": medians,
              "all_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "all_ms"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
