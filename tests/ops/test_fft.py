"""emamba::fftn_ortho, the FFT custom op that compiled EinFFT uses on CUDA (see emamba.ops.fft)."""

from __future__ import annotations

import pytest
import torch

from emamba.layers import einfft as einfft_mod
from emamba.layers.einfft import EinFFT
from emamba.ops.fft import fftn_ortho

DIMS = [(2, 3), (3,), (1, 2, 3)]


def _input(complex_input: bool, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 4, generator=g, dtype=dtype)
    if complex_input:
        x = torch.complex(x, torch.randn(x.shape, generator=g, dtype=dtype))
    return x.permute(0, 2, 1, 3)  # non-contiguous on purpose: the output must still be contiguous


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("complex_input", [False, True])
def test_matches_torch_fft_and_is_contiguous(dim, inverse, complex_input):
    x = _input(complex_input)
    expected = (torch.fft.ifftn if inverse else torch.fft.fftn)(x, dim=dim, norm="ortho")
    out = fftn_ortho(x, list(dim), inverse)
    assert out.is_contiguous()
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("complex_input", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(complex_input, inverse):
    x = _input(complex_input).requires_grad_(True)
    # a real-valued function of the complex output, as in EinFFT (ReLU/soft-shrink of re/im, then .real)
    assert torch.autograd.gradcheck(lambda t: torch.view_as_real(fftn_ortho(t, [1, 3], inverse)), (x,))


@pytest.mark.parametrize("complex_input", [False, True])
def test_opcheck(complex_input):
    x = _input(complex_input, dtype=torch.float32).contiguous().requires_grad_(True)
    torch.library.opcheck(torch.ops.emamba.fftn_ortho.default, (x, [2, 3], False))


@pytest.mark.parametrize("fft_mode", ["tokens_blocks", "tokens"])
def test_compiled_einfft_through_the_op_matches_eager(monkeypatch, fft_mode):
    """Force the compiled-for-CUDA path on CPU: inductor must trace through the op, same values and grads."""
    torch.manual_seed(0)
    layer = EinFFT(16, num_blocks=4, fft_mode=fft_mode)
    x = torch.randn(2, 12, 16, requires_grad=True)
    ref = layer(x)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)

    calls = []
    real_op = einfft_mod.fftn_ortho

    def counting_op(*args):
        calls.append(args[1:])
        return real_op(*args)

    monkeypatch.setattr(einfft_mod, "fftn_ortho", counting_op)
    monkeypatch.setattr(einfft_mod, "_needs_exact_fft_strides", lambda t: torch.compiler.is_compiling())
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch._dynamo.reset()
    assert len(calls) == 2  # traced once: the forward FFT and the inverse one went through the op
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
