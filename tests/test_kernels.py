"""Kernel adapters against the float64 reference; selection and its error messages."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import attention_reference, rel_err
from tokenring.execution.kernels import (
    BACKENDS,
    BlockSpec,
    delta_surrogate,
    kernel_names,
    select_kernel,
)
from tokenring.execution.kernels.cpu_flash import CpuFlash
from tokenring.execution.kernels.reference import MathKernel

CPU_KERNELS = [CpuFlash(), MathKernel()]


def _rowmajor_view(x: torch.Tensor) -> torch.Tensor:
    """The strided [B, L, H, D] view the executor hands to kernels (storage [L, B, H, D])."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("kernel", CPU_KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_forward_backward_match_reference(kernel, heads, causal):
    torch.manual_seed(0)
    b, length, d = 3, 12, 40
    q = _rowmajor_view(torch.randn(b, length, heads[0], d))
    k = _rowmajor_view(torch.randn(b, length, heads[1], d))
    v = _rowmajor_view(torch.randn(b, length, heads[1], d))
    do = torch.randn(b, length, heads[0], d)
    scale = 0.3
    out, lse = kernel.forward(q, k, v, causal, scale)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(qr, kr, vr, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (b, heads[0], length) and lse.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    assert rel_err(lse, ref_lse) < 1e-6
    grads = torch.autograd.grad(ref, (qr, kr, vr), do.double())
    delta = (do * out).sum(-1).transpose(1, 2)
    for given_out in (out, None):  # with the real output, and from delta alone
        got = kernel.backward(do, q, k, v, given_out, lse, delta, causal, scale)
        for g, r in zip(got, grads):
            assert g.shape == r.shape
            assert rel_err(g, r) < 1e-5


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    dim=st.integers(1, 33),
    magnitude=st.sampled_from([1e-20, 1e-3, 1.0, 1e4]),
    zero_row=st.booleans(),
)
def test_delta_surrogate_reproduces_row_sums(rows, dim, magnitude, zero_row):
    g = torch.Generator().manual_seed(rows * 100 + dim)
    do = torch.randn(2, rows, 3, dim, generator=g) * magnitude
    out = torch.randn(2, rows, 3, dim, generator=g)
    if zero_row:
        do[:, 0] = 0
    delta = (do * out).sum(-1).transpose(1, 2)
    sur = delta_surrogate(do, delta)
    got = (do * sur).sum(-1).transpose(1, 2)
    assert torch.isfinite(sur).all()
    torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-30)


def test_auto_picks_the_cpu_flash_kernel_on_cpu():
    spec = BlockSpec("cpu", torch.bfloat16, 128, 32, 8, True)
    assert select_kernel("auto", spec).name == "cpu_flash"


def test_unknown_kernel_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown kernel 'fast'; valid values are 'auto'"):
        select_kernel("fast", BlockSpec("cpu", torch.float32, 64, 4, 4, False))
    assert set(kernel_names()) == {"auto", *(b.name for b in BACKENDS)}


def test_unsupported_kernel_says_why():
    with pytest.raises(ValueError, match=r"kernel 'cudnn' cannot run .*device 'cpu' not in"):
        select_kernel("cudnn", BlockSpec("cpu", torch.float32, 64, 4, 4, False))


def test_nothing_fits_lists_every_backend_with_reasons():
    spec = BlockSpec("cpu", torch.int8, 64, 4, 4, False)
    with pytest.raises(ValueError) as info:
        select_kernel("auto", spec)
    for backend in BACKENDS:
        assert f"  {backend.name}: " in str(info.value)
