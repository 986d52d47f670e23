"""Interleaved training-step throughput of several timm models on the CPU (same process, same moments).

    python scripts/train_step_speed.py --models emamba_tiny resnet18 --img-size 32 --in-chans 1 --batch-size 64

Each round times --steps optimizer steps (forward, backward, AdamW) of every model in turn, so background
load affects all models alike; prints images/s per round and the median.
"""

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import emamba  # noqa: F401


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["emamba_tiny", "resnet18"])
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    setups = {}
    for name in args.models:
        kwargs = {"token_label": False} if name.startswith("emamba") else {}
        model = timm.create_model(name, num_classes=10, in_chans=args.in_chans, **kwargs).train()
        setups[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    rates = {name: [] for name in args.models}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (model, opt) in setups.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if r:
                rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
    for name, values in rates.items():
        print(f"{name:<14} img/s per round {', '.join(f'{v:.1f}' for v in values)}  median {statistics.median(values):.1f}"
              f"  -> {60000 / statistics.median(values):.0f} s per 60k-image epoch")


if __name__ == "__main__":
    main()
