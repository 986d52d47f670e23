"""torch.compile vs eager for an EMamba model on one device, measured in one process.

Eager and compiled steps alternate (A/B/A/B ...) so that a change in machine load hits both equally;
the ratio is median(eager) / median(compiled). Compile time is reported separately.

    python benchmarks/compile.py --model emamba_tiny --batch-size 8 --img-size 64 --bench infer
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import emamba  # noqa: F401


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="emamba_tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--bench", choices=["infer", "train"], default="infer")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    args = p.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, token_label=args.bench == "infer")
    model.train(args.bench == "train")
    compiled = torch.compile(model, fullgraph=True, backend=args.backend)
    x = torch.randn(args.batch_size, model.in_chans, args.img_size, args.img_size)
    target = torch.randint(model.num_classes, (args.batch_size,))

    def step(fn):
        if args.bench == "infer":
            with torch.no_grad():
                return fn(x)
        loss = F.cross_entropy(fn(x), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    step(compiled)
    compile_s = time.perf_counter() - start
    step(model)
    eager, comp = [], []
    for _ in range(args.repeats):
        for fn, times in ((model, eager), (compiled, comp)):
            t = time.perf_counter()
            step(fn)
            times.append(time.perf_counter() - t)
    result = {"model": args.model, "bench": args.bench, "batch_size": args.batch_size, "img_size": args.img_size,
              "threads": torch.get_num_threads(), "compile_backend": args.backend, "compile_s": compile_s,
              "eager_ms": 1e3 * statistics.median(eager), "compiled_ms": 1e3 * statistics.median(comp),
              "speedup": statistics.median(eager) / statistics.median(comp)}
    print(f"{args.model} {args.bench} batch {args.batch_size} @ {args.img_size}px: eager {result['eager_ms']:.1f} ms, "
          f"compiled {result['compiled_ms']:.1f} ms -> {result['speedup']:.2f}x (compile took {compile_s:.0f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
