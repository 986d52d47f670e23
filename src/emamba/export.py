"""``emamba export``: an EMamba vision model as ONNX or as a ``torch.export`` program (``.pt2``).

What works (tested in ``tests/models/test_export.py``):

* ``torch.export``: the graph keeps the fused scan as one ``emamba::selective_scan_fwd`` custom op
  (``emamba::selective_scan_infer`` when traced with grad mode off), so the program runs wherever the
  ``emamba`` package is importable (it registers the ops).
* ONNX (``torch.onnx.export(..., dynamo=True)``, needs ``onnx`` and ``onnxscript``): the fused scan op has
  no ONNX translation, so for the export every Mamba mixer switches to the pure-PyTorch ``torch`` scan
  backend, whose chunked log-depth scan is made of standard ops; the ONNX graph holds that scan unrolled
  for the exported token count (fixed image size; the batch size stays dynamic). EinFFT's FFTs become
  ONNX ``DFT`` ops and its block layers real ``MatMul``s. With ``onnxruntime`` installed, the file is run on
  the example input and compared with the PyTorch model before it is reported as written.

    emamba export --model emamba_s --checkpoint runs/emamba_s/best.pth --img-size 224 --out emamba_s.onnx
    emamba export --model emamba_tiny --num-classes 10 --in-chans 1 --img-size 64 --out tiny.pt2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from .layers import MambaMixer

__all__ = ["scan_backend", "export_onnx", "main"]


@contextlib.contextmanager
def scan_backend(model: nn.Module, backend: str) -> Iterator[nn.Module]:
    """Temporarily run every Mamba mixer of ``model`` on one scan backend (restored on exit)."""
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    saved = [m.backend for m in mixers]
    try:
        for m in mixers:
            m.backend = backend
        yield model
    finally:
        for m, b in zip(mixers, saved):
            m.backend = b


def _dynamic_batch() -> tuple[dict[int, Any]]:
    """``dynamic_shapes`` for the single image argument: the batch dimension varies, the image size does not."""
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, dynamic_batch: bool = True,
                verify: bool = True, optimize: bool = True) -> dict[str, Any]:
    """Write ``model`` (eval mode) as ONNX to ``path``; returns a summary (and ``max_abs_diff`` if verified).

    The input's spatial size is fixed by ``example``; with ``dynamic_batch`` its batch size is not.
    Verification runs the file with onnxruntime when it is installed and raises if it disagrees with the
    PyTorch model beyond float tolerance. ``optimize`` runs onnxscript's graph optimizer (constant
    folding, fusions); on the full-size models its pattern matching over the unrolled scan takes longer
    than the export itself (see the README), so the CLI offers ``--no-optimize``.
    """
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it; fail with the fix, not a traceback)
    except ImportError as exc:
        raise RuntimeError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dynamic_shapes = _dynamic_batch() if dynamic_batch else None
    start = time.perf_counter()
    with scan_backend(model, "torch"), torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=["images"], output_names=["logits"], verbose=False,
                                    optimize=optimize)
    program.save(str(path))
    summary: dict[str, Any] = {"path": str(path), "format": "onnx", "optimized": optimize,
                               "export_s": time.perf_counter() - start,
                               "size_mb": path.stat().st_size / 2**20}
    if verify:
        try:
            import onnxruntime as ort
        except ImportError:
            summary["verified"] = "skipped (onnxruntime not installed)"
            return summary
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: example.numpy()})[0])
        with torch.no_grad():
            want = model(example)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"ONNX output differs from the PyTorch model: {m}")
        summary["verified"] = "onnxruntime"
        summary["max_abs_diff"] = float((got - want).abs().max())
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emamba export", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=None, help="registered model name (default: the checkpoint's, else emamba_s)")
    p.add_argument("--checkpoint", default=None, help="training state (.pth), state dict or .safetensors")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects in the checkpoint")
    p.add_argument("--use-ema", action="store_true", help="export the EMA weights of a training state")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the example input")
    p.add_argument("--out", required=True, help="output file: .onnx or .pt2 (torch.export program)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size in the exported graph")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the onnxruntime check")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="skip onnxscript's graph optimizer (much faster export of the full-size models)")
    return p


def _build(args: argparse.Namespace) -> nn.Module:
    import timm

    import emamba  # noqa: F401  (registers the models)

    from .engine.checkpoint import load_checkpoint, load_model_weights

    state: dict[str, Any] = {}
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
    saved = state.get("args") if isinstance(state.get("args"), dict) else {}
    args.model = args.model or saved.get("model") or "emamba_s"
    args.img_size = args.img_size or saved.get("img_size") or 224
    args.in_chans = args.in_chans or saved.get("in_chans") or 3
    num_classes = args.num_classes or saved.get("num_classes")
    if num_classes is None and isinstance(state.get("model"), dict) and "head.weight" in state["model"]:
        num_classes = state["model"]["head.weight"].shape[0]
    kwargs = {"in_chans": args.in_chans, "num_classes": num_classes or 1000}
    model = timm.create_model(args.model, **kwargs)
    if args.checkpoint:
        load_model_weights(model, state, args.checkpoint, use_ema=args.use_ema)
    return model.eval()


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .engine.checkpoint import CheckpointError

    out = Path(args.out)
    if out.suffix not in (".onnx", ".pt2"):
        print(f"error: --out must end in .onnx or .pt2, got {out.name}", file=sys.stderr)
        return 2
    try:
        model = _build(args)
        example = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size)
        if out.suffix == ".onnx":
            summary = export_onnx(model, example, out, dynamic_batch=not args.static_batch, verify=args.verify,
                                  optimize=args.optimize)
        else:
            start = time.perf_counter()
            dynamic = None if args.static_batch else _dynamic_batch()
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.export.save(program, str(out))
            summary = {"path": str(out), "format": "torch.export", "export_s": time.perf_counter() - start,
                       "size_mb": out.stat().st_size / 2**20}
    except (CheckpointError, RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary.update(model=args.model, img_size=args.img_size, in_chans=args.in_chans)
    print(f"wrote {summary['path']} ({summary['format']}, {summary['size_mb']:.1f} MB, "
          f"{summary['export_s']:.0f} s) - verified: {summary.get('verified', 'no')}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
