"""``emamba`` command line: one entry point, one subcommand per job.

Subcommands import their implementation lazily so that ``emamba models`` stays fast and a broken optional
dependency of one job never breaks the others. Each job module exposes ``main(argv) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional

# name -> (module with main(argv), one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "models": ("emamba.cli", "list the registered models with their parameter counts"),
    "flops": ("emamba.flops", "parameters, GMACs (paper convention) and full GFLOPs of a model"),
    "train": ("emamba.train", "train / fine-tune / evaluate an image classifier (torchrun-ready)"),
    "validate": ("emamba.validate", "evaluate a checkpoint on an image folder (top-1, top-5, loss)"),
    "make-token-labels": ("emamba.engine.token_labels", "write dense token-label maps from a teacher"),
    "forecast": ("emamba.engine.forecast", "multivariate long-horizon forecasting (Time-Series-Library args)"),
    "export": ("emamba.export", "write a model as ONNX or a torch.export program (.pt2)"),
    "benchmark": ("emamba.benchmark", "throughput, latency and memory of a model (timm benchmark style)"),
}


def models_main(argv: Optional[list[str]] = None) -> int:
    """``emamba models``: the registered EMamba models and their parameter counts."""
    import timm
    import torch

    import emamba  # noqa: F401  (registers the models)

    parser = argparse.ArgumentParser(prog="emamba models", description=models_main.__doc__)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    names = timm.list_models("emamba_*")
    print(f"{'model':<16} {'params (M)':>11}  mixer")
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=args.num_classes)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<16} {params / 1e6:>11.2f}  {model.mixer}")
    return 0


def _resolve(name: str) -> Callable[[list[str]], int]:
    module_name, _ = SUBCOMMANDS[name]
    if name == "models":
        return models_main
    module = importlib.import_module(module_name)
    return module.main


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: emamba <command> [options]", "", "commands:"]
        lines += [f"  {name:<18} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        lines += ["", "Run `emamba <command> --help` for the options of one command."]
        print("\n".join(lines))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "--version":
        from emamba import __version__

        print(__version__)
        return 0
    if command not in SUBCOMMANDS:
        print(f"emamba: unknown command {command!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    try:
        main_fn = _resolve(command)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("emamba"):
            print(f"emamba: the {command!r} command is not available in this build ({exc})", file=sys.stderr)
            return 2
        raise
    result = main_fn(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
