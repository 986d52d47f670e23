"""Every available scan backend against the sequential reference: values, gradients, dtypes, errors."""

from __future__ import annotations

import importlib
import itertools
import warnings

import pytest
import torch

from emamba.ops import BACKENDS, available_backends, selective_scan, selective_scan_reference
from scan_inputs import make_inputs, reference_grads

# `emamba.ops.selective_scan` is also the name of the re-exported function, so fetch the module itself.
scan_mod = importlib.import_module("emamba.ops.selective_scan")

CPU_BACKENDS = [b for b in available_backends() if b in ("torch", "cpu")]
if torch.cuda.is_available():
    CUDA_BACKENDS = [b for b in available_backends() if b in ("torch", "triton", "mamba_ssm")]
else:
    CUDA_BACKENDS = []
CASES = [("cpu", b) for b in CPU_BACKENDS] + [("cuda", b) for b in CUDA_BACKENDS]
OPTIONS = list(itertools.product([False, True], repeat=4))  # z, D, delta_bias, softplus


def run_with_grads(fn, inputs, softplus, dout):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    y = fn(**args, delta_softplus=softplus)
    y.backward(dout)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("use_z,use_D,use_bias,softplus", OPTIONS)
def test_backend_matches_reference(device, backend, use_z, use_D, use_bias, softplus):
    # Without softplus the steps must be positive: a negative step makes exp(dt * A) > 1 and the recurrence
    # grow to ~1e13, where elementwise tolerances test fp32 cancellation rather than the backend (delta +
    # delta_bias was negative in that case until this was fixed, and a one-ulp change in the exp failed it).
    inputs = make_inputs(2, 6, 37, 8, device=device, z=use_z, D=use_D, delta_bias=use_bias, seed=1,
                         delta_init="normal" if softplus else "positive")
    dout = torch.randn(2, 6, 37, generator=torch.Generator().manual_seed(2)).to(device)
    y_ref, g_ref = reference_grads(inputs, softplus, dout)
    g_ref = {k: v for k, v in g_ref.items() if v is not None}
    y, grads = run_with_grads(lambda **kw: selective_scan(**kw, backend=backend), inputs, softplus, dout)
    assert y.dtype == torch.float32 and y.shape == (2, 6, 37)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    assert set(grads) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(grads[name].double(), g_ref[name], rtol=2e-4, atol=2e-4, msg=f"d{name} ({backend})")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 129, 200])
def test_lengths(device, backend, length):
    """Lengths below, at and across chunk boundaries (chunks are 16-64 steps in the fused kernels)."""
    inputs = make_inputs(1, 3, length, 4, device=device, seed=length)
    dout = torch.randn(1, 3, length, generator=torch.Generator().manual_seed(3)).to(device)
    y_ref, g_ref = reference_grads(inputs, True, dout)
    y, grads = run_with_grads(lambda **kw: selective_scan(**kw, backend=backend), inputs, True, dout)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    for name in g_ref:
        torch.testing.assert_close(grads[name].double(), g_ref[name], rtol=2e-4, atol=2e-4, msg=f"d{name}")


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS + ["reference"]])
def test_gradcheck_fp64(backend):
    inputs = make_inputs(1, 2, 5, 3, dtype=torch.float64, seed=4)
    names = list(inputs)
    tensors = tuple(inputs[k].requires_grad_(True) for k in names)

    def fn(*args):
        return selective_scan(**dict(zip(names, args)), delta_softplus=True, backend=backend)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp64_matches_reference_tightly(backend):
    inputs = make_inputs(2, 4, 50, 6, dtype=torch.float64, seed=5)
    y_ref = selective_scan_reference(**inputs, delta_softplus=True)
    y = selective_scan(**inputs, delta_softplus=True, backend=backend)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_autocast_runs_in_fp32(backend):
    inputs = make_inputs(2, 4, 20, 8, seed=6)
    half = {k: v.bfloat16() if v is not None else None for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(**half, delta_softplus=True, backend=backend)
    assert y.dtype == torch.float32
    expected = selective_scan_reference(**{k: v.float() if v is not None else None for k, v in half.items()},
                                        delta_softplus=True)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_available_backends_always_has_portable_ones():
    backends = available_backends()
    assert {"reference", "torch"} <= set(backends)
    assert set(backends) <= set(BACKENDS)
    if not torch.cuda.is_available():
        assert "mamba_ssm" not in backends


@pytest.mark.parametrize(
    "name,bad,message",
    [
        ("u", torch.zeros(2, 4), "u must be"),
        ("A", torch.zeros(5, 3), "A must be"),
        ("B", torch.zeros(2, 3, 9), "B must have shape"),
        ("C", torch.zeros(2, 4, 10), "C must have shape"),
        ("D", torch.zeros(3), "D must have shape"),
        ("z", torch.zeros(2, 4, 9), "z must have shape"),
        ("delta_bias", torch.zeros(4, 1), "delta_bias must have shape"),
        ("delta", torch.zeros(2, 4, 11), "delta must have shape"),
    ],
)
def test_bad_shapes_raise(name, bad, message):
    inputs = make_inputs(2, 4, 10, 3)
    inputs[name] = bad
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs, backend="reference")


def test_unknown_and_unavailable_backend():
    inputs = make_inputs(1, 2, 4, 2)
    with pytest.raises(ValueError, match="unknown scan backend"):
        selective_scan(**inputs, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            selective_scan(**inputs, backend="mamba_ssm")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv(scan_mod.ENV_VAR, "reference")
    assert scan_mod.resolve_backend("auto", torch.device("cpu"), torch.float32) == "reference"
    monkeypatch.setenv(scan_mod.ENV_VAR, "torch")
    assert scan_mod.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    # an explicit argument wins over the environment
    assert scan_mod.resolve_backend("reference", torch.device("cpu"), torch.float32) == "reference"


def test_auto_prefers_fused_cpu_kernel(monkeypatch):
    monkeypatch.delenv(scan_mod.ENV_VAR, raising=False)
    expected = "cpu" if "cpu" in available_backends() else "torch"
    assert scan_mod.resolve_backend("auto", torch.device("cpu"), torch.float32) == expected


def test_fallback_warns_once_with_fix(monkeypatch):
    monkeypatch.delenv(scan_mod.ENV_VAR, raising=False)
    monkeypatch.setitem(scan_mod._availability, "cpu", (False, "no C++ compiler found"))
    monkeypatch.setattr(scan_mod, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*apt-get install"):
        assert scan_mod.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scan_mod.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"


def test_meta_tensors_propagate_shapes():
    inputs = {k: v.to("meta") if v is not None else None for k, v in make_inputs(2, 4, 10, 3).items()}
    y = selective_scan(**inputs, delta_softplus=True)
    assert y.device.type == "meta" and y.shape == (2, 4, 10)


@pytest.mark.skipif("cpu" not in available_backends(), reason="fused CPU kernel not available")
def test_torch_compile_has_no_graph_break_at_the_scan():
    """The fused scan is a registered custom op: dynamo must trace it with fullgraph=True."""
    inputs = make_inputs(1, 4, 12, 4, seed=7)

    def fn(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, backend="cpu") * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = compiled(**leaves)
    y.sum().backward()
    expected = selective_scan_reference(**inputs, delta_softplus=True) * 2
    torch.testing.assert_close(y.detach(), expected, rtol=1e-4, atol=1e-4)
    assert all(v.grad is not None for v in leaves.values())


@pytest.mark.skipif("cpu" not in available_backends(), reason="fused CPU kernel not available")
def test_custom_op_passes_opcheck():
    """torch.library.opcheck validates the fake (meta) kernel and the autograd registration."""
    inputs = make_inputs(1, 3, 9, 4, seed=8)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    torch.library.opcheck(scan_mod._fused_fwd, (*args, True, "cpu"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
