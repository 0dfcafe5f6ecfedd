"""Records: several components of the same rows as one message (``records.py``)."""

from __future__ import annotations

import pytest
import torch

from tokenring.execution.records import RecordLayout, joint_storage, pack_records

# (per-token shape, dtype) of what travels together: k and v; out and lse (accumulator);
# out in the input dtype and lse; a backward's query bundle
SETS = {
    "k, v": [((2, 3, 8), torch.float32), ((2, 3, 8), torch.float32)],
    "out, lse": [((2, 3, 8), torch.float32), ((2, 3), torch.float32)],
    "bf16 out, lse": [((1, 4, 6), torch.bfloat16), ((1, 4), torch.float32)],
    "q, do, lse, delta": [
        ((1, 3, 5), torch.float16),
        ((1, 3, 5), torch.float16),
        ((1, 3), torch.float64),
        ((1, 3), torch.float64),
    ],
}


def _random(shape, dtype, generator):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("name", SETS)
def test_packed_rows_arrive_as_the_receivers_components(name: str) -> None:
    """What a sender packs from separate tensors, received as bytes into joint storage,
    reads back through the receiver's component views exactly; any run of tokens of
    the storage is one contiguous piece (sent and received as it is)."""
    parts = SETS[name]
    g = torch.Generator().manual_seed(0)
    tokens = 7
    sent = [_random((tokens, *shape), dtype, g) for shape, dtype in parts]
    packed = pack_records(sent)
    storage, views = joint_storage((tokens,), parts, torch.device("cpu"))
    assert packed.nbytes == storage.nbytes
    storage.view(torch.uint8).view(-1).copy_(packed.contiguous().view(-1).view(torch.uint8))
    for view, tensor in zip(views, sent):
        assert view.shape == tensor.shape and view.dtype == tensor.dtype
        torch.testing.assert_close(view, tensor, rtol=0, atol=0)
    assert storage[2:5].is_contiguous()
    for (_, dtype), offset in zip(parts, RecordLayout.of(parts).offsets):
        assert offset * storage.element_size() % dtype.itemsize == 0  # aligned


def test_group_major_storage_keeps_each_group_and_token_run_apart() -> None:
    """``[G, T]`` records: writing one group's component leaves every other untouched."""
    parts = SETS["out, lse"]
    storage, (out, lse) = joint_storage((3, 4), parts, torch.device("cpu"))
    storage.zero_()
    out[1, 2].fill_(1.0)
    lse[2, 0].fill_(2.0)
    assert out.sum() == out[1, 2].numel() and lse.sum() == 2.0 * lse[2, 0].numel()
    assert storage[1, 2].sum() == out[1, 2].numel() and storage[1, 1:2].sum() == 0


def test_records_inside_a_larger_buffer_read_their_own_bytes() -> None:
    """Storage that starts inside a larger buffer (the call's scratch, ``storage.py``):
    each component view reads the records there, not the buffer's start."""
    parts = SETS["bf16 out, lse"]
    layout = RecordLayout.of(parts)
    buffer = torch.zeros(3 * layout.size + 40, dtype=layout.unit)
    storage = buffer[40:].view(3, layout.size)
    alone, views = torch.zeros(3, layout.size, dtype=layout.unit), layout.views(storage, parts)
    g = torch.Generator().manual_seed(1)
    for view, reference in zip(views, layout.views(alone, parts)):
        value = _random(view.shape, view.dtype, g)
        view.copy_(value)
        reference.copy_(value)
    assert torch.equal(buffer[:40], torch.zeros(40, dtype=layout.unit))
    assert torch.equal(storage, alone)
