"""torch.compile and torch.export of the vision model (the fused scan is a registered custom op)."""

from __future__ import annotations

import pytest
import timm
import torch

import emamba  # noqa: F401
from emamba.ops import available_backends


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    return timm.create_model("emamba_tiny").eval(), torch.randn(2, 3, 64, 64)


def test_torch_compile_traces_the_whole_model_without_graph_breaks(model_and_input):
    model, x = model_and_input
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("cpu" not in available_backends(), reason="fused CPU kernel not available")
def test_torch_export_round_trip(model_and_input):
    model, x = model_and_input
    program = torch.export.export(model, (x,))
    # the scan sits inside the autocast-disabled region, a nested graph of the exported program
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    targets = {str(node.target) for graph in graphs for node in graph.nodes if node.op == "call_function"}
    assert any("emamba.selective_scan_fwd" in t for t in targets), "the scan should stay one custom op"
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_in_a_fresh_process():
    """Backend resolution (import + kernel build checks) must not be traced on the first call."""
    import subprocess
    import sys

    code = (
        "import torch, timm, emamba\n"
        "m = timm.create_model('emamba_tiny').eval(); x = torch.randn(1, 3, 32, 32)\n"
        "c = torch.compile(m, fullgraph=True, backend='aot_eager')\n"
        "with torch.no_grad(): torch.testing.assert_close(c(x), m(x))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
