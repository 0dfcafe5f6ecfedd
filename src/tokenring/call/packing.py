"""Reading the mask arguments users give in flash-attention's conventions.

``cu_seqlens``: the offsets of the documents packed in the global sequence,
``[0, ..., S]``, as a list, a tuple or a 1-D integer tensor (on any device; a
device tensor is read once per call here). ``window_size=(left, right)``: query
``i`` sees key ``j`` when ``i - left <= j <= i + right``, ``-1`` unbounded. Each
reader returns the value in the form a ``Mask`` takes and a problem ("" when
there is none), so that callers can collect every problem before raising.
Pure: no process state.
"""

from __future__ import annotations

import torch

__all__ = ["read_documents", "read_window"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_documents(cu_seqlens: object) -> tuple[tuple[int, ...], str]:
    """``cu_seqlens`` as a tuple of ints (empty for None or empty: one document), and what
    is wrong with it."""
    if cu_seqlens is None or (isinstance(cu_seqlens, (list, tuple)) and not cu_seqlens):
        return (), ""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
            return (), (
                f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} of shape "
                f"{tuple(cu_seqlens.shape)}"
            )
        values = tuple(int(n) for n in cu_seqlens.tolist())
    elif isinstance(cu_seqlens, (list, tuple)) and all(_is_int(n) for n in cu_seqlens):
        values = tuple(cu_seqlens)
    else:
        return (), (
            "cu_seqlens must be the document offsets [0, ..., seq_len] as a list, a tuple "
            f"or a 1-D integer tensor, got {type(cu_seqlens).__name__}"
        )
    if len(values) < 2 or values[0] != 0:
        return (), f"cu_seqlens must start at 0 and name at least one document, got {list(values)}"
    shrinking = [i for i in range(1, len(values)) if values[i] <= values[i - 1]]
    if shrinking:
        i = shrinking[0]
        return (), (
            f"cu_seqlens must increase (every document holds a token): entry {i} is "
            f"{values[i]} after {values[i - 1]}"
        )
    return values, ""


def read_window(window_size: object, causal: bool) -> tuple[tuple[int, int], str]:
    """``window_size`` as ``(left, right)`` (``(-1, -1)`` for None), and what is wrong
    with it: each side an int of at least -1; under ``causal`` the right side 0 or -1."""
    if window_size is None:
        return (-1, -1), ""
    if (
        not isinstance(window_size, (list, tuple))
        or len(window_size) != 2
        or not all(_is_int(n) and n >= -1 for n in window_size)
    ):
        return (-1, -1), (
            "window_size must be (left, right), two ints of at least -1 (-1: unbounded), "
            f"got {window_size!r}"
        )
    left, right = window_size
    if causal and right not in (0, -1):
        return (-1, -1), (
            f"window_size={tuple(window_size)} with causal=True: the right side must be 0 or "
            "-1 (a causal query sees no later key)"
        )
    return (left, right), ""
