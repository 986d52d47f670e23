"""Offline compiles of Triton kernels for an H100 (sm_90): PTX and cubin, no GPU needed.

The interpreter runs the kernels' semantics on CPU; this checks that Triton's compiler accepts them too
(constexpr branches, dtypes, layouts), which the interpreter never exercises. It runs in a subprocess: once
``triton.language`` is imported with ``TRITON_INTERPRET=1`` (as in the test processes without CUDA), its
helpers are interpreter functions that the compiler rejects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import importlib, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

for spec in json.loads(sys.argv[1]):
    module = importlib.import_module(spec["module"])
    constexprs = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                  for k, v in spec["constexprs"].items()}
    signature = {**spec["signature"], **{k: "constexpr" for k in constexprs}}
    try:
        compiled = triton.compile(ASTSource(JITFunction(getattr(module, spec["kernel"])), signature, constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": spec["num_warps"]})
    except RuntimeError as exc:
        if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
            print("NO_PTXAS", exc)
            sys.exit(0)
        raise
    assert compiled.asm["cubin"], spec["kernel"]
    print("COMPILED", spec["kernel"])
"""


def compile_for_sm90(specs: list[dict]) -> subprocess.CompletedProcess:
    """Compile every ``{module, kernel, signature, constexprs, num_warps}`` spec (constexpr dtypes as "tl.float32").

    ``signature`` maps the runtime arguments to Triton types ("*fp32", "i32"). Returns the finished process;
    its stdout has one ``COMPILED name`` line per kernel, or ``NO_PTXAS`` when the toolchain is missing.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(specs)], capture_output=True, text=True,
                          env=env, timeout=600)
