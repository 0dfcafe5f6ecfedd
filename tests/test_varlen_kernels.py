"""Masked blocks as variable-length calls (``kernels.varlen``), on the CPU.

The packing, write-back, merge and gradient scatter of ``VarlenMasks`` are
tested through a float64 stand-in for flash-attention's variable-length call
(``EmulatedVarlen``: each sequence under its bottom-right window, as flash
documents it), against float64 attention under the block's explicit mask; the
real call is checked the same way on the GPU (``test_gpu.py``).
"""

from __future__ import annotations

import random

import torch

from reference import attention_reference
from test_masks import random_block
from tokenring.execution.block_masks import block_mask
from tokenring.execution.kernels.reference import MathKernel
from tokenring.execution.kernels.varlen import VarlenGroup, VarlenMasks


def _window_allowed(sq: int, sk: int, left: int, right: int) -> torch.Tensor:
    """Flash-attention's bottom-right window: query i sees key j when
    ``i + sk - sq - left <= j <= i + sk - sq + right`` (-1 unbounded)."""
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


class EmulatedVarlen(VarlenMasks, MathKernel):
    """Flash's variable-length call in float64 math, sequence by sequence."""

    name = "emulated-varlen"

    @staticmethod
    def _sequences(group: VarlenGroup):
        cu_q, cu_k = group.cu_q.tolist(), group.cu_k.tolist()
        for n in range(len(cu_q) - 1):
            qs, ks = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
            yield qs, ks, _window_allowed(qs.stop - qs.start, ks.stop - ks.start,
                                          group.left, group.right)  # fmt: skip

    def _varlen_forward(self, q, k, v, group, scale):
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
        for qs, ks, allowed in self._sequences(group):
            o, s = self._forward(q[None, qs], k[None, ks], v[None, ks], False, scale, allowed)
            out[qs], lse[:, qs] = o[0], s[0]
        return out, lse

    def _varlen_backward(self, do, q, k, v, out, lse, group, scale):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for qs, ks, allowed in self._sequences(group):
            delta = (do[qs].double() * out[qs].double()).sum(-1).T[None]
            gq, gk, gv = self._backward(
                do[None, qs], q[None, qs], k[None, ks], v[None, ks], None, lse[None, :, qs],
                delta, False, scale, allowed,
            )  # fmt: skip
            dq[qs] += gq[0]
            dk[ks] += gk[0]
            dv[ks] += gv[0]
        return dq, dk, dv


def random_blocks(rng: random.Random, count: int):
    """``count`` random non-empty blocks (``test_masks.random_block``, up to 3 ranks and
    30 tokens): ``(q_cells, kv_cells, mask, allowed)``, the last the block's explicit
    mask from the positions."""
    made = 0
    while made < count:
        b = random_block(rng, max_world=3, max_seq=30)
        if not b.q_pos or not b.kv_pos:
            continue
        made += 1
        allowed = b.mask.allowed(torch.tensor(b.q_pos), torch.tensor(b.kv_pos))
        yield b.q_cells, b.kv_cells, b.mask, allowed


def check_varlen_kernel(kernel, blocks, dtype, device, tol=None) -> list[dict]:
    """Each block through ``kernel`` against float64 attention under its explicit mask,
    batch 1 and 2, MHA, GQA and MQA: output and LSE of the whole block, and its
    gradients given its own LSE and output (or only the row sums ``delta``, as when the
    output did not travel); rows with no key: zero and -inf. Returns the errors."""
    from reference import grad_floor, rel_err

    found = []
    for n, (q_cells, kv_cells, mask, allowed) in enumerate(blocks):
        batch, heads, heads_kv = [(1, 4, 4), (2, 4, 2), (1, 2, 1)][n % 3]
        gen = torch.Generator().manual_seed(n)
        lq, lk = allowed.shape
        q = torch.randn(batch, lq, heads, 64, generator=gen).to(device, dtype)
        k, v = (torch.randn(batch, lk, heads_kv, 64, generator=gen).to(device, dtype)
                for _ in range(2))  # fmt: skip
        do = torch.randn(q.shape, generator=gen).to(device, dtype)
        scale = 64**-0.5
        bm = block_mask(q_cells, kv_cells, mask, torch.device(device))
        out, lse = kernel.forward(q, k, v, False, scale, bm)
        seen = allowed.any(dim=1).to(device)
        qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
        ref_out, ref_lse = attention_reference(qr, kr, vr, causal=False, scale=scale,
                                               allowed=allowed)  # fmt: skip
        assert (out[:, ~seen] == 0).all() and torch.isneginf(lse[:, :, ~seen]).all()
        errs = {"out": rel_err(out[:, seen], ref_out[:, seen]),
                "lse": rel_err(lse[:, :, seen], ref_lse[:, :, seen])}  # fmt: skip
        grads = torch.autograd.grad(ref_out[:, seen], (qr, kr, vr), do[:, seen].double())
        delta = (do.double() * out.double()).sum(-1).transpose(1, 2).to(lse.dtype)
        for given_out in (out, None):
            got = kernel.backward(do, q, k, v, given_out, lse, delta, False, scale, bm)
            for name, g, want in zip(("dq", "dk", "dv"), got, grads, strict=True):
                floor = grad_floor(want, grads)  # dq of rows with one key: exactly 0
                errs[name] = max(errs.get(name, 0.0), rel_err(g, want, floor))
        found.append(errs)
        if tol is not None:
            bad = {name: e for name, e in errs.items() if not e <= tol}
            assert not bad, (mask, bad)
    return found


def test_varlen_blocks_match_attention_under_the_explicit_mask():
    """``VarlenMasks`` through the float64 stand-in of flash's call, on random blocks."""
    blocks = random_blocks(random.Random(5), 60)
    check_varlen_kernel(EmulatedVarlen(), blocks, torch.float64, "cpu", tol=1e-10)
