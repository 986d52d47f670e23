"""The mixer's channels-first projections (emamba.ops.projection): every GEMM path equals weight @ x[b], and
the dispatch takes oneDNN only where it may (fp32 CPU inference, fused backend, large enough GEMMs)."""

from __future__ import annotations

import pytest
import timm
import torch

import emamba  # noqa: F401
from emamba.layers.mamba import MambaMixer
from emamba.ops import channels_first_linear, cpu_gemm, projection, set_cpu_gemm

needs_onednn = pytest.mark.skipif(not projection._onednn_usable(), reason="PyTorch build without oneDNN linear")

# (out, in, batch, L) -> the path under a forced oneDNN engine: the model's shapes and the rule's edges
SHAPES = [
    ((128, 64, 3, 1024), "onednn"),  # stage-1 in_proj half
    ((132, 128, 2, 300), "onednn"),  # x_proj, L not a multiple of anything
    ((128, 4, 2, 1024), "bmm"),  # dt_proj: inner size below ONEDNN_MIN_INNER
    ((256, 32, 2, 500), "onednn"),  # inner size at the threshold, 4.1 MFLOP per image
    ((256, 32, 2, 400), "bmm"),  # 3.3 MFLOP per image: under the threshold
    ((896, 448, 4, 1), "fold"),  # class-token block: one GEMM over the batch
]


@pytest.fixture(autouse=True)
def automatic_engine():
    yield
    set_cpu_gemm(None)


def product(weight, x):
    return torch.einsum("oi,bil->bol", weight.double(), x.double())


@needs_onednn
@pytest.mark.parametrize("engine", ["blas", "onednn"])
@pytest.mark.parametrize("shape,onednn_path", SHAPES, ids=lambda v: str(v))
def test_every_path_equals_the_product(shape, onednn_path, engine):
    out_f, in_f, batch, length = shape
    torch.manual_seed(0)
    weight, x = torch.randn(out_f, in_f), torch.randn(batch, in_f, length)
    set_cpu_gemm(engine)
    with torch.no_grad():
        path = projection.projection_path(weight, x)
        y = channels_first_linear(weight, x)
    expected_path = onednn_path if engine == "onednn" or onednn_path == "fold" else "bmm"
    assert path == expected_path
    assert y.shape == (batch, out_f, length) and y.is_contiguous() and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), product(weight, x), rtol=1e-5, atol=1e-4 * in_f**0.5)


@pytest.mark.parametrize("length", [1, 17])
def test_gradients_flow_on_the_paths_autograd_takes(length):
    set_cpu_gemm("onednn")  # forced, yet a gradient must keep the differentiable GEMMs
    torch.manual_seed(1)
    weight = torch.randn(256, 64, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 64, length, dtype=torch.float64, requires_grad=True)
    assert projection.projection_path(weight.float(), x.float().requires_grad_()) != "onednn"
    # fast_mode: random directional derivatives instead of the full 18k-column numerical Jacobian (40 s here)
    assert torch.autograd.gradcheck(lambda w, v: channels_first_linear(w, v), (weight, x), fast_mode=True)


@needs_onednn
def test_onednn_only_where_allowed():
    set_cpu_gemm("onednn")
    weight, x = torch.randn(128, 64), torch.randn(2, 64, 1024)
    with torch.no_grad():
        assert projection.projection_path(weight, x) == "onednn"
        assert projection.projection_path(weight, x, backend="reference") == "bmm"  # plain-PyTorch baselines
        assert projection.projection_path(weight, x, backend="torch") == "bmm"
        assert projection.projection_path(weight.double(), x.double()) == "bmm"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert projection.projection_path(weight, x) == "bmm"
            assert channels_first_linear(weight, x).dtype == torch.bfloat16  # autocast still applies
    # gradient needed by either operand
    assert projection.projection_path(weight.requires_grad_(), x) == "bmm"
    with torch.no_grad():
        assert projection.projection_path(weight, x) == "onednn"  # no grad mode: nothing to differentiate
    set_cpu_gemm("blas")
    with torch.no_grad():
        assert projection.projection_path(weight, x) == "bmm"


@needs_onednn
@pytest.mark.parametrize("blocker", ["reference", "needs_grad", "autocast", "traced"])
def test_run_level_rule_blocks_onednn(blocker):
    """Each run-level condition alone keeps oneDNN off (``emamba benchmark`` reports the rule from it)."""
    set_cpu_gemm("onednn")
    flags = dict(needs_grad=False, autocast=False, traced=False)
    assert projection.onednn_allowed("cpu", **flags)
    backend = "reference" if blocker == "reference" else "cpu"
    if blocker in flags:
        flags[blocker] = True
    assert not projection.onednn_allowed(backend, **flags)
    set_cpu_gemm("blas")
    assert not projection.onednn_allowed("cpu", needs_grad=False, autocast=False, traced=False)


@pytest.mark.parametrize(
    "vendor,usable,capability,isa_cap,threads,expected",
    [
        ("AuthenticAMD", True, "AVX512", None, 1, "onednn"),
        ("AuthenticAMD", True, "AVX512", "avx512_core", 1, "onednn"),
        ("AuthenticAMD", True, "AVX512", None, 2, "blas"),  # no gain measured with two threads
        ("AuthenticAMD", True, "AVX512", "AVX2", 1, "blas"),  # oneDNN capped: measured slower than MKL
        ("AuthenticAMD", True, "AVX2", None, 1, "blas"),
        ("GenuineIntel", True, "AVX512", None, 1, "blas"),
        ("AuthenticAMD", False, "AVX512", None, 1, "blas"),
        ("arm", True, "DEFAULT", None, 1, "blas"),
    ],
)
def test_automatic_engine_where_onednn_was_measured_faster(
    monkeypatch, vendor, usable, capability, isa_cap, threads, expected
):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(projection, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(projection, "_onednn_usable", lambda: usable)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.delenv("EMAMBA_CPU_GEMM", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if isa_cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_cap)
    assert cpu_gemm() == expected
    monkeypatch.setenv("EMAMBA_CPU_GEMM", "BLAS")
    assert cpu_gemm() == "blas"
    monkeypatch.setenv("EMAMBA_CPU_GEMM", "onednn")
    assert cpu_gemm() == ("onednn" if usable else "blas")
    set_cpu_gemm("auto")  # the setter wins over the environment
    assert cpu_gemm() == expected


def test_bad_engine_and_shapes_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="must be one of"):
        set_cpu_gemm("mkl")
    monkeypatch.setenv("EMAMBA_CPU_GEMM", "cublas")
    with pytest.raises(ValueError, match="EMAMBA_CPU_GEMM must be one of"):
        cpu_gemm()
    with pytest.raises(ValueError, match="matching in"):
        channels_first_linear(torch.randn(8, 5), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="matching in"):
        channels_first_linear(torch.randn(8, 4), torch.randn(4, 3))


def onednn_everywhere(monkeypatch):
    """Thresholds off, engine forced: every projection that may take oneDNN takes it; returns a call counter."""
    monkeypatch.setattr(projection, "ONEDNN_MIN_INNER", 1)
    monkeypatch.setattr(projection, "ONEDNN_MIN_FLOPS_PER_IMAGE", 0)
    calls = []
    real = projection.onednn_per_image
    monkeypatch.setattr(projection, "onednn_per_image", lambda w, x: calls.append(1) or real(w, x))
    set_cpu_gemm("onednn")
    return calls


@needs_onednn
def test_model_outputs_agree_across_engines(monkeypatch):
    calls = onednn_everywhere(monkeypatch)
    torch.manual_seed(0)
    model = timm.create_model("emamba_s").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        set_cpu_gemm("blas")
        blas = model(images)
        set_cpu_gemm("onednn")
        onednn = model(images)
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    assert len(calls) >= 2 * len(mixers)  # every mixer over more than one token: 4 projections
    torch.testing.assert_close(onednn, blas, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_export_never_records_onednn(monkeypatch):
    calls = onednn_everywhere(monkeypatch)
    torch.manual_seed(0)
    model = timm.create_model("emamba_tiny", num_classes=10, in_chans=1, img_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        model(x)
    assert calls, "eager inference should have taken oneDNN"
    with torch.no_grad():  # inference export: without autograd, only the export guard keeps oneDNN out
        program = torch.export.export(model, (x,))
    targets = {str(node.target) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "mkldnn" in t], targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)
