"""Per-layer CPU time of one EMamba training step (forward and backward) or inference step (``--bench
infer``: eval mode, forward only under ``inference_mode``), for finding what dominates.

Every top-level torch call made during the forward is timed with the process CPU clock (so the numbers
are robust to other jobs on a shared machine) and attributed to a layer part by the module it runs in,
the function it calls and, for ``F.linear``, which weight it multiplies:

* MambaMixer: ``in_proj``, ``conv1d+silu``, ``x_proj+dt_proj``, ``scan`` (everything inside
  ``selective_scan``, including its argument copies), ``out_proj``, ``copies/other`` (transposes,
  ``.contiguous()``, chunk/split, dtype casts, ``-exp(A_log)``).
* EinFFT: ``fft`` (forward and inverse), ``block_weights`` (the real block matrices built from the
  complex weights), ``block_matmul`` (the block GEMMs with their biases), ``act`` (ReLU, soft-shrink),
  ``other`` (reshapes, complex packing, casts).
* ConvMlp (``--model emamba_s_mlp``): ``fc1``, ``dwconv`` (with its layout transposes), ``act``, ``fc2``.
* ``layernorm``, ``stem/downsample``, ``class block mlp``, ``head``, ``other`` (residuals, loss, ...).

Backward: every autograd node of the step's graph gets the part of the forward call that created it (a
node created inside a composite call takes the part of the next call that was mapped) and is timed with
pre/post hooks. ``AccumulateGrad`` nodes are reported separately; engine overhead between nodes is the
``unattributed`` row. Times are medians over ``--steps`` steps after ``--warmup`` steps, with
``torch.set_num_threads(--threads)`` (1 by default: per-layer CPU time, no thread-pool noise).

    python benchmarks/profile_block.py --backend auto
    python benchmarks/profile_block.py --backend reference --steps 3
    python benchmarks/profile_block.py --bench infer --steps 10
    python benchmarks/profile_block.py --model emamba_s_mlp --json results/profile_block.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

clock = time.process_time


def _fname(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name


class Profiler(TorchFunctionMode):
    """Times torch calls by layer part (forward) and maps the autograd nodes they create to that part."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from emamba.layers import ConvMlp, EinFFT, MambaMixer, Mlp
        from emamba.models.emamba import Downsample, Stem

        self.fwd = collections.defaultdict(float)
        self.node_part: dict[int, str] = {}  # sequence_nr -> part
        self.module_stack: list[str] = []
        self.forced: list[str] = []
        self.weight_part: dict[int, str] = {}
        kinds = {MambaMixer: "mamba", EinFFT: "einfft", ConvMlp: "convmlp", Mlp: "class block mlp",
                 Stem: "stem/downsample", Downsample: "stem/downsample", nn.LayerNorm: "layernorm"}
        self.handles = []
        for name, mod in model.named_modules():
            kind = next((k for cls, k in kinds.items() if type(mod) is cls), None)
            if name in ("head", "aux_head"):
                kind = "head"
            if kind is None:
                continue
            if kind == "mamba":
                for sub in ("in_proj", "x_proj", "dt_proj", "out_proj", "x_proj_b", "dt_proj_b"):
                    if hasattr(mod, sub):
                        part = "x_proj+dt_proj" if sub.startswith(("x_", "dt_")) else sub
                        self.weight_part[id(getattr(mod, sub).weight)] = f"mamba.{part}"
            if kind == "convmlp":
                self.weight_part[id(mod.fc1.weight)] = "convmlp.fc1"
                self.weight_part[id(mod.fc2.weight)] = "convmlp.fc2"
            self.handles.append(mod.register_forward_pre_hook(self._enter(kind)))
            self.handles.append(mod.register_forward_hook(self._exit))

    def _enter(self, kind: str):
        def hook(module, args):
            self.module_stack.append(kind)  # returns None: the inputs are left alone

        return hook

    def _exit(self, module, args, output):
        self.module_stack.pop()  # returns None: the output is left alone

    # -- forward --------------------------------------------------------------------------------------
    def part(self, func, args) -> str:
        stack = self.module_stack
        if "stem/downsample" in stack:
            return "stem/downsample"
        if not stack:
            return "other (residual, loss, ...)"
        kind = stack[-1]
        name = _fname(func)
        if kind == "mamba":
            if name in ("linear", "bmm", "matmul", "mm"):  # which projection: by the weight it multiplies
                for a in args:
                    if isinstance(a, torch.Tensor):
                        for t in (a, a._base):
                            if t is not None and id(t) in self.weight_part:
                                return self.weight_part[id(t)]
                return "mamba.linear?"
            if name in ("conv1d", "silu"):
                return "mamba.conv1d+silu"
            return "mamba.copies/other"
        if kind == "einfft":
            if "fft" in name:
                return "einfft.fft"
            if name in ("bmm", "matmul", "einsum", "mm", "baddbmm"):
                return "einfft.block_matmul"
            if name in ("relu", "softshrink", "relu_"):
                return "einfft.act"
            return "einfft.other"
        if kind == "convmlp":
            if name == "linear":
                return self.weight_part.get(id(args[1]), "convmlp.linear?")
            if name == "conv2d":
                return "convmlp.dwconv"
            if name == "gelu":
                return "convmlp.act"
            return "convmlp.dwconv"  # the token <-> grid transposes/reshapes around the conv
        return kind

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.forced:  # inside a region wrapper: timed as a whole there
            out = func(*args, **kwargs)
            self._map(out, self.forced[-1])
            return out
        part = self.part(func, args)
        t0 = clock()
        out = func(*args, **kwargs)
        self.fwd[part] += clock() - t0
        self._map(out, part)
        return out

    def _map(self, out, part: str) -> None:
        if isinstance(out, torch.Tensor):
            if out.grad_fn is not None:
                self.node_part.setdefault(out.grad_fn._sequence_nr(), part)
        elif isinstance(out, (tuple, list)):
            for o in out:
                self._map(o, part)

    def forced_region(self, part: str, fn):
        def wrapped(*args, **kwargs):
            self.forced.append(part)
            t0 = clock()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.forced.pop()
            self.fwd[part] += clock() - t0
            self._map(out, part)
            return out

        return wrapped


def _graph_nodes(roots):
    seen, stack, nodes = set(), [r for r in roots if r is not None], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(nf for nf, _ in node.next_functions if nf is not None)
    return nodes


def time_backward(loss: torch.Tensor, node_part: dict[int, str]) -> tuple[dict[str, float], float]:
    nodes = _graph_nodes([loss.grad_fn])
    mapped = sorted(node_part.items())
    seqs = [s for s, _ in mapped]
    import bisect

    bwd = collections.defaultdict(float)
    handles, starts = [], {}
    for node in nodes:
        name = type(node).__name__
        if name == "AccumulateGrad":
            part = "accumulate grad"
        else:
            seq = node._sequence_nr()
            i = bisect.bisect_left(seqs, seq)
            part = mapped[i][1] if i < len(mapped) else "other (residual, loss, ...)"

        def pre(grad_outputs, key=id(node)):
            starts[key] = clock()

        def post(grad_inputs, grad_outputs, key=id(node), part=part):
            bwd[part] += clock() - starts[key]

        handles.append(node.register_prehook(pre))
        handles.append(node.register_hook(post))
    t0 = clock()
    loss.backward()
    total = clock() - t0
    for h in handles:
        h.remove()
    return bwd, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="emamba_s")
    p.add_argument("--backend", default="auto")
    p.add_argument("--bench", choices=("train", "infer"), default="train",
                   help="train: forward + backward + SGD step; infer: eval-mode forward under inference_mode")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the medians to this file")
    args = p.parse_args()

    import timm

    import emamba  # noqa: F401
    import emamba.layers.einfft as einfft_mod
    import emamba.layers.mamba as mamba_mod
    from emamba.benchmark import train_loss
    from emamba.ops import resolve_backend

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backend = resolve_backend(args.backend, torch.device("cpu"), torch.float32)
    model = timm.create_model(args.model, num_classes=1000, scan_backend=args.backend).train()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    target = torch.randint(1000, (args.batch_size,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    prof = Profiler(model)
    # Region wrappers (patched on the layer modules' globals, so the layers' own calls go through them).
    orig_scan = mamba_mod.selective_scan
    mamba_mod.selective_scan = prof.forced_region("mamba.scan", orig_scan)
    if hasattr(mamba_mod, "causal_conv1d_silu"):  # the fused conv op (absent in older revisions)
        mamba_mod.causal_conv1d_silu = prof.forced_region("mamba.conv1d+silu", mamba_mod.causal_conv1d_silu)
    if hasattr(mamba_mod, "channels_first_linear"):  # the projections' GEMM dispatch (oneDNN or BLAS)
        project = mamba_mod.channels_first_linear

        def attributed_projection(weight, x, backend="auto"):
            owner = weight._base if weight._base is not None else weight  # in_proj's halves are views
            part = prof.weight_part.get(id(owner), "mamba.linear?")
            return prof.forced_region(part, project)(weight, x, backend)

        mamba_mod.channels_first_linear = attributed_projection
    if hasattr(einfft_mod.EinFFT, "_expand_block_weights"):  # building the real block matrices
        expand = einfft_mod.EinFFT._expand_block_weights
        einfft_mod.EinFFT._expand_block_weights = prof.forced_region("einfft.block_weights", expand)
    elif hasattr(einfft_mod, "_complex_block_linear"):  # older revisions (for before/after comparisons)
        einfft_mod._complex_block_linear = prof.forced_region("einfft.block_matmul",
                                                              einfft_mod._complex_block_linear)

    per_step = []
    infer = args.bench == "infer"
    if infer:
        model.eval()
    for step in range(args.warmup + args.steps):
        prof.fwd.clear()
        prof.node_part.clear()
        t0 = clock()
        if infer:
            with prof, torch.inference_mode():
                model(x)
            if step >= args.warmup:
                per_step.append((dict(prof.fwd), {}, clock() - t0, 0.0, 0.0))
            continue
        with prof:
            loss = train_loss(model(x), target)
        t_fwd = clock() - t0
        opt.zero_grad(set_to_none=True)
        bwd, t_bwd = time_backward(loss, prof.node_part)
        t0 = clock()
        opt.step()
        t_opt = clock() - t0
        if step >= args.warmup:
            per_step.append((dict(prof.fwd), dict(bwd), t_fwd, t_bwd, t_opt))
        del loss

    parts = sorted({k for f, b, *_ in per_step for k in list(f) + list(b)})

    def med(values):
        return statistics.median(values) * 1e3

    rows = []
    for part in parts:
        f = med([s[0].get(part, 0.0) for s in per_step])
        b = med([s[1].get(part, 0.0) for s in per_step])
        rows.append((part, f, b))
    t_fwd = med([s[2] for s in per_step])
    t_bwd = med([s[3] for s in per_step])
    t_opt = med([s[4] for s in per_step])
    unf = t_fwd - sum(r[1] for r in rows)
    unb = t_bwd - sum(r[2] for r in rows)
    print(f"{args.model} {args.bench} step, batch {args.batch_size} @ {args.img_size}px, backend {backend} "
          f"({args.backend}), {args.threads} thread(s), process CPU ms, median of {args.steps} steps")
    print(f"{'part':32s} {'forward':>10s} {'backward':>10s} {'total':>10s}")
    for part, f, b in sorted(rows, key=lambda r: -(r[1] + r[2])):
        print(f"{part:32s} {f:10.1f} {b:10.1f} {f + b:10.1f}")
    print(f"{'unattributed (glue/engine)':32s} {unf:10.1f} {unb:10.1f} {unf + unb:10.1f}")
    print(f"{'optimizer step':32s} {'':10s} {'':10s} {t_opt:10.1f}")
    print(f"{'TOTAL step':32s} {t_fwd:10.1f} {t_bwd:10.1f} {t_fwd + t_bwd + t_opt:10.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "bench": args.bench, "backend": backend, "batch_size": args.batch_size,
                       "img_size": args.img_size, "threads": args.threads, "steps": args.steps,
                       "parts_ms": {p: {"forward": f, "backward": b} for p, f, b in rows},
                       "unattributed_ms": {"forward": unf, "backward": unb},
                       "optimizer_ms": t_opt, "forward_ms": t_fwd, "backward_ms": t_bwd}, fh, indent=1)


if __name__ == "__main__":
    main()
