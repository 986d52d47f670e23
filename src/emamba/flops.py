"""FLOP counting for EMamba models, in two conventions.

``gmacs_paper``
    Multiply-accumulates of ``nn.Linear`` and ``nn.Conv1d/2d`` layers only, batch 1. This is the rule the
    SiMBA paper's numbers follow: Mamba's projections and its depthwise conv1d are counted; the selective
    scan, the FFTs, EinFFT's block matmuls, norms and activations are not.

``gflops_full``
    Everything, in FLOPs (1 MAC = 2 FLOPs):

    * Linear / Conv layers: 2 x MACs (+ 1 per output for a bias).
    * Selective scan, per (batch, channel, step): ``n * 7 + 12`` - for each of the n states: delta*A, exp,
      (delta*u)*B, decay*h + drive (2), C*h accumulate (2); per channel and step: delta bias, softplus (3),
      delta*u, D*u + add (2), SiLU(z) (4) and the gate (1).
    * FFT: ``5 N log2 N`` per complex transform of length N (Cooley-Tukey count), forward and inverse.
    * EinFFT block matmuls: each complex block layer is 4 real (bs x bs) products per token and block
      (2 x 4 x bs^2 FLOPs) plus the complex bias; ReLU and soft-shrink 1 and 2 FLOPs per value.
    * LayerNorm 8, BatchNorm 2 (folded at inference), GELU 8, SiLU 4, ReLU 1 FLOPs per element;
      residual adds and DropPath-free elementwise work 1 per element.

Counting runs the model on the ``meta`` device, so it is fast and allocates nothing.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .layers import EinFFT, MambaMixer


@dataclass
class FlopCount:
    params: int = 0
    macs_paper: int = 0
    flops_full: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, flops: int) -> None:
        self.flops_full += int(flops)
        self.breakdown[kind] = self.breakdown.get(kind, 0) + int(flops)


def _linear_conv_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    kernel = math.prod(module.kernel_size)
    return out.numel() * (module.in_channels // module.groups) * kernel


def scan_flops(batch: int, d: int, length: int, n: int) -> int:
    return batch * d * length * (7 * n + 12)


def fft_flops(length: int, transforms: int) -> int:
    return int(5 * length * math.log2(length) * transforms) if length > 1 else 0


_ELEMENTWISE = {nn.LayerNorm: 8, nn.BatchNorm2d: 2, nn.GELU: 8, nn.SiLU: 4, nn.ReLU: 1}


def count_flops(model: nn.Module, input_size: tuple[int, ...]) -> FlopCount:
    """Count parameters, paper-convention MACs and full FLOPs of ``model`` for one input of ``input_size``.

    ``input_size`` is (C, H, W) without the batch dimension; the model is copied to the meta device.
    """
    result = FlopCount(params=sum(p.numel() for p in model.parameters()))
    handles = []

    def on_linear_conv(module, inputs, out):
        macs = _linear_conv_macs(module, out)
        result.macs_paper += macs
        bias = out.numel() if module.bias is not None else 0
        result.add("linear_conv", 2 * macs + bias)

    def on_mamba(module: MambaMixer, inputs, out):
        batch, length, _ = inputs[0].shape
        branches = 2 if module.bidirectional else 1
        # dt_proj is applied with F.linear on its weight (its bias goes into the scan as delta_bias), so its
        # Linear hook never fires: count its MACs here. The bias add is part of the scan's per-step cost.
        dt_macs = branches * batch * length * module.dt_rank * module.d_inner
        result.macs_paper += dt_macs
        result.add("linear_conv", 2 * dt_macs)
        result.add("selective_scan", branches * scan_flops(batch, module.d_inner, length, module.d_state))
        result.add("elementwise", branches * batch * length * module.d_inner * 4)  # SiLU after the conv

    def on_einfft(module: EinFFT, inputs, out):
        batch, tokens, channels = inputs[0].shape
        nb, bs = module.num_blocks, module.block_size
        fft_len = tokens * nb if module.fft_mode == "tokens_blocks" else tokens
        transforms = batch * channels // (nb if module.fft_mode == "tokens_blocks" else 1)
        result.add("fft", 2 * fft_flops(fft_len, transforms))
        values = batch * tokens * channels  # complex values per layer
        result.add("einfft_matmul", 2 * (2 * 4 * bs * values + 2 * values))
        result.add("elementwise", 2 * values * 1 + 2 * values * 2)  # ReLU (re, im) + soft-shrink (re, im)

    def on_elementwise(module, inputs, out):
        per = next(v for k, v in _ELEMENTWISE.items() if isinstance(module, k))
        result.add("elementwise", per * out.numel())

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            handles.append(module.register_forward_hook(on_linear_conv))
        elif isinstance(module, MambaMixer):
            handles.append(module.register_forward_hook(on_mamba))
        elif isinstance(module, EinFFT):
            handles.append(module.register_forward_hook(on_einfft))
        elif isinstance(module, tuple(_ELEMENTWISE)):
            handles.append(module.register_forward_hook(on_elementwise))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=next(model.parameters()).device))
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return result


def model_flops(name: str, img_size: int = 224, **kwargs) -> FlopCount:
    """Build a registered model on the meta device (no memory, no init cost) and count it."""
    import timm

    import emamba  # noqa: F401  (registers the models)

    with torch.device("meta"):
        model = timm.create_model(name, scan_backend="torch", **kwargs)
    return count_flops(model, (model.in_chans, img_size, img_size))


def main(argv: Optional[list[str]] = None) -> int:
    import timm

    import emamba  # noqa: F401

    parser = argparse.ArgumentParser(
        prog="emamba flops",
        description="Parameters, GMACs (paper convention: Linear+Conv MACs) and full GFLOPs of EMamba models.",
    )
    parser.add_argument("models", nargs="*", help="model names (default: every registered emamba model)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print one JSON object per model")
    args = parser.parse_args(argv)
    names = args.models or timm.list_models("emamba_*")
    unknown = [n for n in names if n not in timm.list_models("emamba_*")]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}; see `emamba models`")
    rows = []
    for name in names:
        count = model_flops(name, args.img_size, num_classes=args.num_classes)
        rows.append((name, count))
        if args.json:
            print(json.dumps({
                "model": name,
                "img_size": args.img_size,
                "params": count.params,
                "gmacs_paper": round(count.macs_paper / 1e9, 4),
                "gflops_full": round(count.flops_full / 1e9, 4),
                "gflops_breakdown": {k: round(v / 1e9, 4) for k, v in sorted(count.breakdown.items())},
            }))
    if not args.json:
        print(f"{'model':<16} {'params (M)':>10} {'GMACs (paper)':>14} {'GFLOPs (full)':>14}   @ {args.img_size}px")
        for name, count in rows:
            print(f"{name:<16} {count.params / 1e6:>10.2f} {count.macs_paper / 1e9:>14.2f} {count.flops_full / 1e9:>14.2f}")
    return 0
