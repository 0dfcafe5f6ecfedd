"""The description of a call: what every rank must agree on, written once.

``Options`` is what the caller chooses (strategy, layout, mask, scale, kernel, ...):
strings are parsed into enums here, once, and every problem found is collected
rather than the first raised. ``CallDescription`` adds what the tensors say
(shapes, dtype, device type), where the call runs (ranks, Ulysses degree) and
the global sequence length. A correct call has the same description on every
rank, so it is what the ranks agree on, the key of the plans each group keeps,
what the custom op carries (``Options.encode``), and what the planner, ``auto``,
the layer and the integrations take. A schedule's key and a kernel's query are
derived from it; nothing else restates it. Pure: no process state.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from functools import cached_property, lru_cache

import torch

from ..options import JointStrategy, Layout, Pass, RingImpl, Strategy, read_enum
from ..schedules.geometry import Geometry, PieceTable, local_lengths, piece_table
from ..schedules.key import ScheduleKey
from ..schedules.masks import Mask
from .packing import read_documents, read_window

__all__ = ["AUTO", "OPTION_NAMES", "CallDescription", "JointShape", "Options", "encode_values"]

AUTO = "auto"
"""``strategy="auto"``: the planner picks (``tokenring.api.auto``); not a ``Strategy``,
since it is resolved to one before anything runs."""

_ENUMS: dict[str, type[Enum]] = {
    "strategy": Strategy,
    "ring_impl": RingImpl,
    "layout": Layout,
    "joint_strategy": JointStrategy,
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_value(name: str, value: object) -> tuple[object, str]:
    """One option's value, parsed, or a problem that says what is wrong with it."""
    if name in _ENUMS:
        return read_enum(_ENUMS[name], value, name, (AUTO,) if name == "strategy" else ())
    if name in ("causal", "deterministic"):
        ok = isinstance(value, bool)
        return value, "" if ok else f"{name} must be a bool, got {value!r}"
    if name == "softmax_scale":
        if value is None:
            return None, ""
        if _is_number(value) and math.isfinite(value):
            return float(value), ""
        return None, f"softmax_scale must be a finite number or None, got {value!r}"
    if name == "kernel":
        ok = isinstance(value, str)
        return (
            value,
            "" if ok else f"kernel must be a str (tokenring.kernel_names()), got {value!r}",
        )
    if name == "cu_seqlens":
        return read_documents(value)
    if name == "window_size":
        return read_window(value, causal=False)  # the causal side: Options.parse
    if name == "seq_len":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
        return (
            value,
            "" if ok else f"seq_len must be a positive int (the global length), got {value!r}",
        )
    raise AssertionError(f"no parser for option {name!r}")


@dataclass(frozen=True)
class Options:
    """What the caller chose for a call (see ``tokenring.attention`` for each).

    ``strategy`` may be ``"auto"`` until the planner resolves it. ``seq_len`` is the
    global sequence length, needed when shards are of unequal length (``None``: every
    rank holds the same number of tokens, ``world`` times its own). ``window_size``
    ``(left, right)`` (``(-1, -1)``: none) and ``cu_seqlens`` (document offsets; empty:
    one document) complete the mask (``schedules.masks.Mask``).
    """

    strategy: Strategy | str = Strategy.TOKENRING
    ring_impl: RingImpl = RingImpl.TOKENRING
    layout: Layout = Layout.CONTIGUOUS
    causal: bool = False
    softmax_scale: float | None = None
    kernel: str = "auto"
    deterministic: bool = False
    joint_strategy: JointStrategy = JointStrategy.NONE
    seq_len: int | None = None
    window_size: tuple[int, int] = (-1, -1)
    cu_seqlens: tuple[int, ...] = ()

    @classmethod
    def parse(cls, **given: object) -> tuple[Options, tuple[str, ...]]:
        """The options named by ``given`` (strings or enums), and every problem found;
        where a value is wrong the default stands in."""
        values: dict[str, object] = {}
        problems: list[str] = []
        for f in fields(cls):
            if f.name in given:
                value, problem = _parse_value(f.name, given[f.name])
                if problem:
                    problems.append(problem)
                else:
                    values[f.name] = value
        if values.get("causal") and "window_size" in values:
            window, problem = read_window(values["window_size"], causal=True)
            if problem:
                problems.append(problem)
                values["window_size"] = window
        documents = values.get("cu_seqlens", ())
        seq_len = values.get("seq_len")
        if documents and seq_len is not None and documents[-1] != seq_len:
            problems.append(f"cu_seqlens ends at {documents[-1]}, but seq_len is {seq_len}")
        if documents and seq_len is None:
            values["seq_len"] = documents[-1]
        return cls(**values), tuple(problems)

    @classmethod
    def checked(cls, **given: object) -> Options:
        """``parse``, raising one ValueError with every problem (for options set once,
        such as a layer's, checked where they are set)."""
        options, problems = cls.parse(**given)
        if problems:
            raise ValueError("; ".join(problems))
        return options

    @classmethod
    def of_values(cls, values: tuple) -> tuple[Options, tuple[str, ...]]:
        """``parse`` of raw values in ``OPTION_NAMES`` order."""
        return cls.parse(**dict(zip(OPTION_NAMES, values)))

    def values(self) -> tuple:
        """The options as raw values in ``OPTION_NAMES`` order."""
        return tuple(getattr(self, name) for name in OPTION_NAMES)

    def encode(self) -> str:
        """These options as one string (the custom op's argument; ``decode`` reverses)."""
        plain = {k: v.value if isinstance(v, Enum) else v for k, v in asdict(self).items()}
        return json.dumps(plain, sort_keys=True)

    @property
    def mask(self) -> Mask:
        """Which pairs attend, over global positions."""
        return Mask(self.causal, self.window_size, self.cu_seqlens)

    @staticmethod
    @lru_cache(maxsize=256)
    def decode(text: str) -> Options:
        return Options.checked(**json.loads(text))


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Options))
"""The order of raw option values (``tokenring.attention`` hands them over so)."""


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing Dynamo when tokenring
    is imported (a second of ``import tokenring``, paid by every process that never
    compiles): the decorator only marks the function, as done here
    (``tests/test_compile.py`` checks that torch's still marks it so)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def encode_values(values: tuple) -> str:
    """Raw option values, parsed (one ValueError with every problem) and encoded: what a
    compiled call passes its custom op, worked out once at trace time."""
    options, problems = Options.of_values(values)
    if problems:
        raise ValueError("; ".join(problems))
    return options.encode()


@dataclass(frozen=True)
class JointShape:
    """Joint (text) tokens: where they sit, how many there are, whether they have
    queries of their own, and whether some rows are padded (``joint_mask``)."""

    side: JointStrategy
    length: int
    with_queries: bool
    masked: bool = False


@dataclass(frozen=True)
class CallDescription:
    """One call, as every rank must see it (see the module docstring). ``options`` has
    the strategy resolved and ``seq_len`` set to the global length."""

    options: Options
    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype
    device_type: str
    world: int
    ulysses: int = 1
    joint: JointShape | None = None
    wants_grad: bool = False
    sinks: bool = False
    """Per-head sink logits join the softmax (``api/sinks.py``): applied on top of the
    attention, but part of what the ranks agree on."""

    @classmethod
    def of_shape(
        cls, *, world: int, seq_len: int, heads_q: int, heads_kv: int, head_dim: int,
        batch: int = 1, dtype: torch.dtype = torch.bfloat16, layout: Layout | None = None,
        causal: bool = False, strategy: Strategy = Strategy.TOKENRING, ulysses: int = 1,
        device_type: str = "cuda", wants_grad: bool = False,
        window_size: tuple[int, int] = (-1, -1), cu_seqlens: tuple[int, ...] = (),
    ) -> CallDescription:  # fmt: skip
        """A call described by its shapes alone (the planner's questions, tools, tests);
        ``layout`` defaults to zigzag when causal (what balances the work)."""
        if layout is None:
            layout = Layout.ZIGZAG if causal else Layout.CONTIGUOUS
        options = Options(
            strategy=strategy, layout=layout, causal=causal, seq_len=seq_len,
            window_size=window_size, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        return cls(
            options, batch, heads_q, heads_kv, head_dim, dtype, device_type, world, ulysses,
            wants_grad=wants_grad,
        )  # fmt: skip

    @property
    def strategy(self) -> Strategy:
        if not isinstance(self.options.strategy, Strategy):
            raise AssertionError("the strategy of this call has not been resolved")
        return self.options.strategy

    @property
    def seq_len(self) -> int:
        if self.options.seq_len is None:
            raise AssertionError("the global length of this call is not known")
        return self.options.seq_len

    @property
    def layout(self) -> Layout:
        return self.options.layout

    @property
    def causal(self) -> bool:
        return self.options.causal

    @cached_property
    def mask(self) -> Mask:
        """Which pairs attend (made once: every call on one rank reads it)."""
        return self.options.mask

    @property
    def scale(self) -> float:
        given = self.options.softmax_scale
        return given if given is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def itemsize(self) -> int:
        """Bytes per element of the inputs."""
        return self.dtype.itemsize

    @cached_property
    def table(self) -> PieceTable:
        """The pieces of the sequence (``schedules.geometry``)."""
        return piece_table(self.layout, self.seq_len, self.world, self.options.cu_seqlens)

    @cached_property
    def local_lengths(self) -> tuple[int, ...]:
        """Tokens each rank holds (logical rank order for a mesh)."""
        return local_lengths(self.layout, self.seq_len, self.world, self.options.cu_seqlens)

    def streams_tail(self, minimum: int) -> bool:
        """Whether TokenRing returns its last partial in halves: when the longest query
        shard has at least ``minimum`` elements (``Settings.stream_tail_min``). Read off
        the description, so every rank decides the same whatever its own length."""
        longest = max(self.local_lengths)
        return self.batch * longest * self.heads_q * self.head_dim >= minimum

    def schedule_key(self, rank: int, pass_: Pass, stream_tail: bool = True) -> ScheduleKey:
        """What the schedule of ``rank`` for ``pass_`` depends on."""
        ring = self.options.ring_impl
        return ScheduleKey(
            self.strategy, self.layout, self.world, rank, Geometry.self_attention(self.table),
            self.mask, pass_, self.heads_q, self.heads_kv, self.ulysses,
            Strategy(ring.value), stream_tail,
        )  # fmt: skip

    def with_strategy(self, strategy: Strategy, ring_impl: RingImpl | None = None,
                      ulysses: int | None = None) -> CallDescription:  # fmt: skip
        """The same call run by another strategy (``auto``, the planner's candidates)."""
        options = replace(
            self.options, strategy=strategy, ring_impl=ring_impl or self.options.ring_impl
        )
        return replace(self, options=options, ulysses=ulysses or self.ulysses)

    def summary(self) -> str:
        """One line: what runs, over what, on how many ranks."""
        dtype = str(self.dtype).removeprefix("torch.")
        where = (
            f"{self.world // self.ulysses} x {self.ulysses} (ring x ulysses)"
            if self.ulysses > 1
            else f"{self.world} ranks"
        )
        return (
            f"{self.strategy.value}, {self.layout.value}, {self.mask.describe()}, "
            f"{self.seq_len} tokens over {where}, batch "
            f"{self.batch}, heads {self.heads_q}/{self.heads_kv}, head_dim {self.head_dim}, "
            f"{dtype}"
        )
