"""Wall time of each kind of EMamba submodule at one thread and at several, at inference.

``profile_block.py`` says where a step's CPU time goes; this script says which parts gain from a second
thread and which do not. It runs the model once to capture the real input of every stem, downsample,
LayerNorm, Mamba mixer and channel mixer, groups them by (module type, input shape and strides), then times one module
of each group alone on its captured input, alternating the thread counts (``--rounds`` rounds of
``--repeats`` calls; medians). "step share" is the group's time (x its count) at the higher thread count.

    python benchmarks/module_threads.py --model emamba_s --batch-size 4 --img-size 128
    python benchmarks/module_threads.py --threads 1 2 --json results/bench/module_threads.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn as nn

import emamba  # noqa: F401  (registers the models)
from emamba.layers import EinFFT, MambaMixer
from emamba.layers.mlp import ConvMlp, Mlp
from emamba.models.emamba import Downsample, Stem

TIMED = (Stem, Downsample, nn.LayerNorm, MambaMixer, EinFFT, ConvMlp, Mlp)


def capture_groups(model: nn.Module, images: torch.Tensor) -> list[dict]:
    """One entry per (module type, input shape and strides): a module, its captured inputs, the count."""
    groups: dict[tuple, dict] = {}
    handles = []

    def hook(name):
        def pre_hook(module, args):
            first = args[0]
            key = (type(module).__name__, tuple(first.shape), first.stride())
            if key not in groups:  # clone keeps the strides (a stage hands its downsample a channels-last view)
                groups[key] = dict(name=name, module=module, count=0,
                                   args=tuple(a.clone() if torch.is_tensor(a) else a for a in args))
            groups[key]["count"] += 1
        return pre_hook

    for name, module in model.named_modules():
        if isinstance(module, TIMED):
            handles.append(module.register_forward_pre_hook(hook(name)))
    with torch.inference_mode():
        model(images)
    for h in handles:
        h.remove()
    return list(groups.values())


def time_call(module: nn.Module, args: tuple, threads: int, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after two warm-up calls, with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    with torch.inference_mode():
        for _ in range(2):
            module(*args)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(*args)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="emamba_s")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs=2, default=(1, 2), metavar=("FEW", "MANY"))
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the thread counts (median)")
    parser.add_argument("--repeats", type=int, default=15, help="calls per measurement (median)")
    parser.add_argument("--json", help="write the rows as JSON to this path")
    args = parser.parse_args(argv)
    if min(args.threads) < 1 or args.rounds < 1 or args.repeats < 1:
        parser.error("--threads, --rounds and --repeats must be positive")

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    groups = capture_groups(model, torch.randn(args.batch_size, 3, args.img_size, args.img_size))
    few, many = args.threads
    rows = []
    threads_before = torch.get_num_threads()
    try:
        for g in groups:
            t_few, t_many = [], []
            for _ in range(args.rounds):
                t_few.append(time_call(g["module"], g["args"], few, args.repeats))
                t_many.append(time_call(g["module"], g["args"], many, args.repeats))
            first = g["args"][0]
            channels_last_view = (first.dim() == 4 and not first.is_contiguous()
                                  and first.is_contiguous(memory_format=torch.channels_last))
            rows.append(dict(module=type(g["module"]).__name__, example=g["name"], input_shape=list(first.shape),
                             channels_last_view=channels_last_view, count=g["count"],
                             ms_few=1e3 * statistics.median(t_few), ms_many=1e3 * statistics.median(t_many)))
    finally:  # the caller's thread count (this runs inside the test process too)
        torch.set_num_threads(threads_before)
    total_many = sum(r["ms_many"] * r["count"] for r in rows)
    total_few = sum(r["ms_few"] * r["count"] for r in rows)
    print(f"{args.model}, batch {args.batch_size} @ {args.img_size} px, inference, wall ms per call "
          f"(median of {args.rounds} rounds x {args.repeats} calls), threads {few} vs {many}")
    print(f"{'module':12s} {'input':22s} {'count':>5s} {f'{few} thr':>9s} {f'{many} thr':>9s} {'speedup':>8s} {'step share':>10s}")
    for r in rows:
        share = 100 * r["ms_many"] * r["count"] / total_many
        shape = str(tuple(r["input_shape"])) + (" cl" if r["channels_last_view"] else "")
        print(f"{r['module']:12s} {shape:22s} {r['count']:5d} {r['ms_few']:9.2f} {r['ms_many']:9.2f} "
              f"{r['ms_few'] / r['ms_many']:8.2f} {share:9.1f}%")
    print(f"sum over modules: {total_few:.1f} ms at {few} thread(s), {total_many:.1f} ms at {many} "
          f"({total_few / total_many:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=vars(args), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
