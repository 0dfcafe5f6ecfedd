"""Case functions for tests/test_planner.py: ``strategy="auto"`` on the pool."""

from __future__ import annotations

import warnings

import torch

import tokenring as tr
from dist_cases import check_attention, make_inputs
from reference import rel_err


def auto_case(w, *, world: int, layout: str, causal: bool) -> dict:
    """Errors of an ``auto`` call against float64 attention; compiled against eager; the
    choice made and whether it was kept (one entry for the repeated shape)."""
    errors = check_attention(
        w,
        world=world,
        strategy="auto",
        layout=layout,
        causal=causal,
        heads=(4, 2),
        dtype="float32",
        batch=2,
        head_dim=16,
        seq=8 * world,
    )
    group = w.group(world)
    q, k, v, _ = make_inputs(3, 2, 8 * world, (4, 2), 16, torch.float32)
    q, k, v = (tr.shard(t, layout=layout, group=group) for t in (q, k, v))

    def call(q, k, v):
        return tr.attention(q, k, v, strategy="auto", layout=layout, causal=causal, group=group)

    eager = call(q, k, v)
    mine, first = next(reversed(tr.runtime().auto.items()))  # the decision just made
    assert first.description.seq_len == 8 * world and first.description.causal == causal
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(q, k, v)
    report = first.report
    return {
        "errors": errors,
        "compiled_diff": rel_err(compiled, eager),
        "choice": first.strategy.value,
        "explained": report is not None and report.choice in report.explain(),
        "decided_once": tr.runtime().auto.get(mine) is first,
    }


def small_topology_case(w, *, world: int, path: str) -> dict:
    """``auto`` over ``world`` ranks with the one-device topology file ``path`` as the
    setting: its errors against float64 for two call shapes (causal zigzag, then
    contiguous), every warning tokenring gave (even with Python's filter at "always"),
    and the topology the planner priced the last call on."""
    tr.configure(topology=path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shape = dict(heads=(4, 2), dtype="float32", batch=2, head_dim=16, seq_len=True)
            errors = [
                check_attention(w, world=world, strategy="auto", seq=8 * world + extra, **how)
                for extra, how in (
                    (0, dict(layout="zigzag", causal=True, **shape)),
                    (1, dict(layout="contiguous", causal=False, **shape)),
                )
            ]
        (last,) = list(tr.runtime().auto.values())[-1:]
    finally:
        tr.configure(topology=None)
    return {
        "errors": errors,
        "warnings": [str(c.message) for c in caught if str(c.message).startswith("tokenring")],
        "topology": last.report.topology,
    }


def links_case(w) -> dict[str, float]:
    """``tokenring calibrate``'s link measurements over the pool's processes (gloo)."""
    from tokenring_bench.calibrate import calibrate_links

    return calibrate_links(torch.device("cpu"), nbytes=1 << 20)
