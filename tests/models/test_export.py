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


# ----------------------------------------------------------------------------------------------- ONNX
onnx = pytest.importorskip("onnxscript", reason="ONNX export needs onnx + onnxscript (dev extra)")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, model_and_input):
    from emamba.export import export_onnx

    model, x = model_and_input
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    summary = export_onnx(model, x, path, dynamic_batch=True, verify=False)
    return path, summary


def test_onnx_export_restores_the_scan_backend(onnx_file, model_and_input):
    from emamba.layers import MambaMixer

    model, _ = model_and_input
    assert {m.backend for m in model.modules() if isinstance(m, MambaMixer)} == {"auto"}
    assert onnx_file[1]["size_mb"] > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_pytorch_at_any_batch_size(onnx_file, model_and_input, batch):
    ort = pytest.importorskip("onnxruntime")
    model, _ = model_and_input
    x = torch.randn(batch, 3, 64, 64)
    session = ort.InferenceSession(str(onnx_file[0]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


def test_onnx_graph_has_no_custom_or_complex_ops(onnx_file):
    import onnx as onnx_lib

    graph = onnx_lib.load(str(onnx_file[0])).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx", "pkg.onnxscript.torch_lib", "pkg.onnxscript.torch_lib.common"}, domains
    assert "DFT" in {node.op_type for node in graph.node}  # EinFFT's FFTs, as standard ONNX


# ------------------------------------------------------------------------------------------------ CLI
def test_export_cli_pt2_from_a_checkpoint(tmp_path, capsys):
    from emamba import cli
    from emamba.engine.checkpoint import save_safetensors

    torch.manual_seed(1)
    model = timm.create_model("emamba_tiny", num_classes=10, in_chans=1).eval()
    save_safetensors(model.state_dict(), tmp_path / "w.safetensors")
    out = tmp_path / "tiny.pt2"
    argv = ["export", "--model", "emamba_tiny", "--num-classes", "10", "--in-chans", "1", "--img-size", "32",
            "--checkpoint", str(tmp_path / "w.safetensors"), "--out", str(out), "--batch-size", "2"]
    assert cli.main(argv) == 0
    program = torch.export.load(str(out))
    x = torch.randn(3, 1, 32, 32)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("suffix", "must end in .onnx or .pt2"),
    ("mismatch", "does not fit"),
    ("size", "multiples of 32"),
])
def test_export_cli_errors(tmp_path, capsys, case, message):
    from emamba import cli
    from emamba.engine.checkpoint import save_safetensors

    argv = ["export", "--model", "emamba_tiny", "--num-classes", "10", "--img-size", "32", "--out",
            str(tmp_path / ("m.zip" if case == "suffix" else "m.pt2"))]
    if case == "mismatch":
        other = timm.create_model("emamba_tiny", num_classes=5)
        save_safetensors(other.state_dict(), tmp_path / "other.safetensors")
        argv += ["--checkpoint", str(tmp_path / "other.safetensors")]
    if case == "size":
        argv[argv.index("32")] = "48"
    assert cli.main(argv) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()
