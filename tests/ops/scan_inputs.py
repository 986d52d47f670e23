"""Shared helpers for the scan tests: random scan inputs, float64 reference gradients, relative errors.

Imported as a plain module (``from scan_inputs import ...``), like tests/engine/engine_helpers.py: pytest's
default import mode puts this directory on sys.path for the test modules next to it.
"""

from __future__ import annotations

import torch

from emamba.ops.scan_reference import selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")  # selective_scan's positional order


def make_inputs(batch, d, length, n, *, dtype=torch.float32, device="cpu", seed=0, D=True, z=True,
                delta_bias=True, delta_init="normal", A_in_fp64=False):
    """Random scan inputs as a dict keyed by NAMES (absent optional inputs are None).

    Everything is drawn in float64 from one ``torch.Generator`` seeded with ``seed``, in the order of NAMES
    (skipping absent inputs), then cast to ``dtype`` and moved to ``device``.

    delta_init: the distribution of delta and delta_bias.
        "normal":   delta ~ 0.5 N(0, 1), delta_bias ~ 0.3 N(0, 1).
        "softplus": delta ~ 0.5 N(0, 1) - 1 (raw pre-softplus values, softplus(-1) ~ 0.3),
                    delta_bias ~ 0.3 N(0, 1).
        "positive": delta ~ U(0.05, 0.55), delta_bias ~ U(0, 0.1): positive steps, for delta_softplus=False.
    A_in_fp64: compute A = -exp(0.5 N(0, 1)) in float64 and cast the result; otherwise the exponential is
        taken after the cast, in ``dtype`` on ``device``.
    """
    if delta_init not in ("normal", "softplus", "positive"):
        raise ValueError(f"unknown delta_init {delta_init!r}")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    def cast(t):
        return t.to(dtype=dtype, device=device)

    u = cast(randn(batch, d, length))
    if delta_init == "normal":
        delta = cast(randn(batch, d, length) * 0.5)
    elif delta_init == "softplus":
        delta = cast(randn(batch, d, length) * 0.5 - 1.0)
    else:
        delta = cast(uniform(batch, d, length) * 0.5 + 0.05)
    A = cast(-torch.exp(randn(d, n) * 0.5)) if A_in_fp64 else -torch.exp(cast(randn(d, n) * 0.5))
    B = cast(randn(batch, n, length))
    C = cast(randn(batch, n, length))
    D = cast(randn(d)) if D else None
    z = cast(randn(batch, d, length)) if z else None
    if not delta_bias:
        delta_bias = None
    elif delta_init == "positive":
        delta_bias = cast(uniform(d) * 0.1)
    else:
        delta_bias = cast(randn(d) * 0.3)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def as_args(inputs):
    """The inputs dict as selective_scan's positional arguments (u, delta, A, B, C, D, z, delta_bias)."""
    return [inputs[k] for k in NAMES]


def reference_grads(inputs, delta_softplus, dout):
    """Output and input gradients of sum(out * dout) through the sequential reference, in float64.

    Returns (out, grads) with grads keyed by NAMES; absent inputs get None.
    """
    leaves = {k: (inputs[k].detach().double().requires_grad_(True) if inputs[k] is not None else None)
              for k in NAMES}
    out = selective_scan_reference(**leaves, delta_softplus=delta_softplus)
    present = [k for k in NAMES if leaves[k] is not None]
    grads = dict(zip(present, torch.autograd.grad(out, [leaves[k] for k in present], dout.double())))
    return out.detach(), {k: grads.get(k) for k in NAMES}


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def record_save_checkpoints(monkeypatch, module):
    """Wraps ``module.forward`` (a fused backend) so that each call's ``save_checkpoints`` flag is appended to
    the returned list: what the entry point asked for, training (True) or inference (False)."""
    calls = []
    real = module.forward

    def spy(*args, save_checkpoints=True):
        calls.append(save_checkpoints)
        return real(*args, save_checkpoints=save_checkpoints)

    monkeypatch.setattr(module, "forward", spy)
    return calls
