"""``tokenring.KVCache``: keys and values of past tokens kept sharded over the ranks, and
attention of new tokens against them (prefill in chunks, decode).

Each rank holds about ``capacity / P`` tokens of every sequence: the token at position
``t`` lives on rank ``t mod P``, at local index ``t // P``, so every rank holds within
one token of the others whatever the lengths, and a rank works out on the device, with
no host sync, which new tokens are its own. A call attends the new queries to every
cached token (all of them precede the new ones) and, by the mask, to the new tokens;
it runs as a schedule over the executor (``schedules/cache.py``): replicated queries
compute a partial per rank and merge the partials in rank order; sharded queries run
the strategy's own schedule (TokenRing passes the queries, the cache never moves).
The new tokens are then appended. See docs/algorithms.md, "KV cache".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..call.description import AUTO, CallDescription, Options
from ..execution.comm import group_world
from ..execution.executor import Execution, run_forward
from ..execution.kernels import KernelBackend, select_kernel
from ..execution.plan import block_spec
from ..execution.slots import SlotGeometry
from ..options import Layout, Pass, RingImpl, Strategy, read_enum
from ..planner.cache_plan import cache_refusal, plan_cache_call
from ..runtime import runtime
from ..runtime.agreement import agree, exchange
from ..runtime.state import BoundedCache
from ..schedules.cache import CacheKey, cache_schedule, chunk_parts
from ..schedules.ir import GROUP_AXIS, Schedule
from .auto import AutoChoice, topology_for
from .cache_capture import CapturedStep
from .sharding import unshard

__all__ = ["KVCache"]

PLANS_KEPT = 64
"""Plans a cache keeps (one per chunk length, strategy and cache size bucket)."""


@dataclass(frozen=True)
class _CachePlan:
    """One kind of cache call, worked out once: its schedule, buffers and kernel."""

    schedule: Schedule
    geometry: SlotGeometry
    execution: Execution


def _cell(longest: int | None, local_capacity: int) -> int:
    """Tokens of each rank's cache piece: the most any row holds on any rank, rounded up
    to a power of two (a plan per doubling, not per step), at most the local capacity;
    the capacity when the lengths are not known on the host."""
    if longest is None:
        return local_capacity
    if longest == 0:
        return 0
    return min(local_capacity, 1 << (longest - 1).bit_length())


class KVCache:
    """Keys and values of ``batch`` sequences of up to ``capacity`` tokens, sharded over
    the ranks of ``group`` (default: the world; one process without torch.distributed).

    ``local_capacity`` tokens per sequence are kept on each rank (``ceil(capacity /
    P)``); ``lengths`` is the int64 tensor ``[batch]`` of tokens cached per sequence
    (global, the same on every rank); ``reset()`` empties the cache. ``attend`` adds
    tokens and returns their attention over everything cached. Inference only: no
    gradients flow through it.
    """

    def __init__(
        self, *, batch: int, capacity: int, heads_kv: int, head_dim: int,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:  # fmt: skip
        for name, value in (("batch", batch), ("capacity", capacity), ("heads_kv", heads_kv),
                            ("head_dim", head_dim)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        self.batch, self.capacity = batch, capacity
        self.heads_kv, self.head_dim = heads_kv, head_dim
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.device = torch.device(device if device is not None else "cpu")
        self.group = group
        self.world, self.rank = group_world(group)
        rt = runtime()
        if self.world > 1:
            rt.remember(group)
        self.local_capacity = -(-capacity // self.world)
        self._k = self._v = torch.empty(0, 0)
        self._grow(1)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self._host: list[int] = [0] * batch
        self._plans = BoundedCache(PLANS_KEPT)
        self._aranges: dict[int, torch.Tensor] = {}
        self._agreed = BoundedCache(PLANS_KEPT)

    def _grow(self, staging: int) -> None:
        """Make room after the local capacity for ``staging`` tokens: this rank's part of
        a chunk sits there while it attends (next to the cache, as its key piece), and
        tokens a rank does not keep are written past the capacity, where nothing reads.
        Batch-major (each row's tokens contiguous, what flash-attention's cache reads
        take)."""
        rows = self.local_capacity + staging
        if self._k.shape[1] >= rows:
            return
        shape = (self.batch, rows, self.heads_kv, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self._k.numel():
            k[:, : self.local_capacity] = self._k[:, : self.local_capacity]
            v[:, : self.local_capacity] = self._v[:, : self.local_capacity]
        self._k, self._v = k, v

    def reset(self) -> None:
        """Forget every cached token."""
        self.lengths.zero_()
        self._host = [0] * self.batch

    def __repr__(self) -> str:
        return (
            f"KVCache(batch={self.batch}, capacity={self.capacity}, heads_kv={self.heads_kv}, "
            f"head_dim={self.head_dim}, dtype={self.dtype}, device={self.device}, "
            f"ranks={self.world}, lengths={self._host})"
        )

    # -- one call ---------------------------------------------------------------
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
        sharded: bool = False, softmax_scale: float | None = None, return_lse: bool = False,
        strategy: str | Strategy = AUTO, new_lengths: torch.Tensor | None = None,
    ):  # fmt: skip
        """Append the new tokens' ``k``, ``v`` and return the attention of ``q`` over every
        cached token and the new ones (``causal``: new query ``i`` sees new keys ``j <=
        i``; every cached token either way).

        ``sharded=False``: ``q`` ``[batch, L, heads_q, head_dim]``, ``k``, ``v`` ``[batch,
        L, heads_kv, head_dim]``, the same on every rank (decode; a model whose other
        layers are not sharded); ``out`` is bitwise the same on every rank.
        ``sharded=True``: this rank's part of the chunk as ``tokenring.shard(x,
        layout="contiguous", dim=1)`` gives it, and ``out`` likewise.
        ``new_lengths``: int ``[batch]``, how many of the ``L`` new tokens of each row are
        real (the real ones first; the rest are neither seen nor cached, their output
        rows are zero); default all. ``strategy``: how sharded queries meet the cache
        (``"auto"``: TokenRing, whose queries travel while the cache stays); replicated
        queries need nothing to travel and run one schedule whatever is named.
        ``return_lse``: also the float32 LSE ``[batch, heads_q, L]``.
        Appending past ``capacity`` raises the same ``ValueError`` on every rank.
        """
        with torch.no_grad():
            out, lse = self._attend(q, k, v, causal, sharded, softmax_scale, strategy, new_lengths)
        return (out, lse) if return_lse else out

    def capture(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
        softmax_scale: float | None = None, return_lse: bool = False, warmup: int = 2,
        clone_outputs: bool = True,
    ) -> CapturedStep:  # fmt: skip
        """One decode step (replicated ``q``, ``k``, ``v`` of these shapes) captured in a
        CUDA graph: ``step(q, k, v)`` then appends and attends as ``attend`` does, the
        lengths advancing on the device, with one graph launch and no host sync
        (``api/cache_capture.py``). Collective: every rank captures at the same point.
        The cache is left as it was (the warm-up and capture calls append nothing)."""
        return CapturedStep(
            self, q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=return_lse,
            warmup=warmup, clone_outputs=clone_outputs,
        )  # fmt: skip

    def _attend(self, q, k, v, causal, sharded, scale, strategy, new_lengths, fixed=False):
        """``attend`` under no_grad; ``fixed``: a cache piece as long as the local
        capacity, whatever the lengths (one plan for every step of a captured graph)."""
        problems = self._problems(q, k, v, causal, sharded, scale, strategy)
        local = q.shape[1] if not problems else 0
        chunk, problems = self._chunk(local, sharded, problems)
        real, problem = self._real(new_lengths, chunk)
        if problem:
            problems.append(problem)
        if problems:  # the same on every rank: inputs alike, or exchanged just now
            raise ValueError("KVCache.attend: " + "; ".join(problems))
        full = [n + r for n, r in zip(self._host, real)]
        if max(full) > self.capacity:
            raise ValueError(
                f"KVCache.attend: appending {max(real)} token(s) would hold "
                f"{max(full)} in a sequence, past the capacity of {self.capacity} "
                f"(lengths now {self._host}); make a larger cache or reset() it"
            )
        padded = any(n != chunk for n in real)
        # where every new query sees every new key, the new tokens join the caches first
        # and the call attends to the caches alone: one block per rank, no merge of a
        # block of the chunk's own (a decode step)
        appended = chunk == 1 or not causal
        longest = max(full) if appended else max(self._host)
        key = CacheKey(
            Strategy.TOKENRING, self.world, self.rank,
            _cell(None if fixed else -(-longest // self.world), self.local_capacity), chunk,
            sharded, causal, ragged_chunk=padded and not causal, heads_q=q.shape[2],
            heads_kv=self.heads_kv, appended=appended,
        )  # fmt: skip
        key = replace(key, strategy=self._strategy(strategy, key, scale))
        plan = self._plan(key, q, scale, sharded)
        if new_lengths is None:  # made on the device: capturable
            real_dev = torch.full((self.batch,), chunk, dtype=torch.int64, device=self.device)
        else:
            real_dev = torch.tensor(real, dtype=torch.int64).to(self.device, non_blocking=True)
        parts = chunk_parts(chunk, self.world)
        a, b = parts[self.rank]
        if appended:
            self._append_all(k, v, chunk, sharded, real_dev)
            end = key.cell
        else:  # this rank's part of the chunk staged next to its cache: its key piece
            self._grow(b - a)
            mine_k, mine_v = (k, v) if sharded else (k[:, a:b], v[:, a:b])
            self._k[:, key.cell : key.cell + b - a] = mine_k
            self._v[:, key.cell : key.cell + b - a] = mine_v
            end = key.cell + b - a
        out, lse = run_forward(
            plan.geometry, q, self._k[:, :end], self._v[:, :end], plan.execution,
            key_lengths=self._key_lengths(key, parts, real_dev),
        )  # fmt: skip
        if padded:  # query rows past a row's real tokens: nothing
            rows = self._arange(out.shape[1]) + (a if sharded else 0)
            pad = rows[None, :] >= real_dev[:, None]
            out = out.masked_fill(pad[:, :, None, None], 0.0)
            lse = lse.masked_fill(pad[:, None, :], float("-inf"))
        if not appended:
            self._append_all(k, v, chunk, sharded, real_dev)
        self._host = full
        return out, lse

    def _append_all(self, k, v, chunk: int, sharded: bool, real: torch.Tensor) -> None:
        """Append the chunk's real tokens (this rank's part of a sharded chunk gathered
        whole first), each rank keeping its own."""
        if sharded:  # every rank's contiguous part: the whole chunk
            whole = {"layout": "contiguous", "dim": 1, "seq_len": chunk, "group": self.group}
            k, v = unshard(k, **whole), unshard(v, **whole)
        self._append(k, v, real)

    # -- checks -----------------------------------------------------------------
    def _problems(self, q, k, v, causal, sharded, scale, strategy) -> list[str]:
        """Everything wrong with this rank's call (collected, not raised)."""
        problems: list[str] = []
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            return ["q, k and v must be tensors"]
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            return [f"q, k, v must be [batch, L, heads, head_dim], got {q.dim()}-, "
                    f"{k.dim()}- and {v.dim()}-dimensional tensors"]  # fmt: skip
        if k.shape != v.shape:
            problems.append(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
        want = (self.batch, q.shape[1], self.heads_kv, self.head_dim)
        if tuple(k.shape) != want:
            problems.append(
                f"k is {tuple(k.shape)}; this cache takes [batch={self.batch}, L={q.shape[1]} "
                f"(q's), heads_kv={self.heads_kv}, head_dim={self.head_dim}]"
            )
        if q.shape[0] != self.batch or q.shape[3] != self.head_dim:
            problems.append(f"q is {tuple(q.shape)}; this cache takes batch {self.batch} "
                            f"and head_dim {self.head_dim}")  # fmt: skip
        if q.shape[2] % self.heads_kv:
            problems.append(
                f"q's {q.shape[2]} heads are not a multiple of the cache's {self.heads_kv}"
            )
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dtype != self.dtype or t.device.type != self.device.type:
                problems.append(f"{name} is {t.dtype} on {t.device.type}; the cache holds "
                                f"{self.dtype} on {self.device.type}")  # fmt: skip
        if not isinstance(causal, bool) or not isinstance(sharded, bool):
            problems.append("causal and sharded must be bools")
        if scale is not None and not isinstance(scale, (int, float)):
            problems.append(f"softmax_scale must be a number or None, got {scale!r}")
        _, problem = read_enum(Strategy, strategy, "strategy", (AUTO,))
        if problem:
            problems.append(problem)
        return problems

    def _chunk(self, local: int, sharded: bool, problems: list[str]) -> tuple[int, list[str]]:
        """The chunk's length over the group, and every rank's problems: sharded calls
        exchange (local length, problems) over the group, which also makes every rank
        raise alike; replicated ones hold the whole chunk already."""
        if not sharded or self.world == 1:
            return local, problems
        rt = runtime()
        reports = exchange((local, problems), rt.lanes(self.group), rt.settings.timeout)
        found = [f"rank {r}: {p}" for r, (_, ps) in enumerate(reports) for p in ps]
        lengths = [n for n, _ in reports]
        expected = [b - a for a, b in chunk_parts(sum(lengths), self.world)]
        if not found and lengths != expected:
            found.append(
                f"sharded=True takes the parts tokenring.shard(x, layout='contiguous', dim=1) "
                f"gives; the ranks hold {lengths} tokens, not {expected}"
            )
        return sum(lengths), found

    def _real(self, new_lengths, chunk: int) -> tuple[list[int], str]:
        """The real new tokens of each row (host ints: the capacity check and the plan
        need them; a tensor on a GPU costs one sync), or a problem."""
        if new_lengths is None:
            return [chunk] * self.batch, ""
        values = (
            new_lengths.tolist() if isinstance(new_lengths, torch.Tensor) else list(new_lengths)
        )
        if len(values) != self.batch or not all(
            isinstance(n, int) and 0 <= n <= chunk for n in values
        ):
            return [chunk] * self.batch, (
                f"new_lengths must hold {self.batch} ints in [0, {chunk}], got {values!r}"
            )
        return values, ""

    def _strategy(self, strategy, key: CacheKey, scale) -> Strategy:
        """The strategy named, or ``auto``'s: the planner's fastest for a sharded chunk on
        this machine (decided once per kind of call, the same on every rank: it reads
        only the call and the topology setting; ``tr.runtime().why()`` says why);
        replicated queries run one schedule whatever is named."""
        name = getattr(strategy, "value", strategy)
        if name != AUTO:
            return Strategy(name)
        if not key.sharded or self.world == 1:
            return Strategy.TOKENRING
        rt = runtime()
        call = self._describe(key, scale)
        found = rt.auto.get_fresh(("kvcache", key, call))
        if found is None:
            report = plan_cache_call(topology_for(rt, call, self.world), call, key)
            best = report.best.strategy if report.priced else Strategy.TOKENRING
            found = AutoChoice(best, RingImpl.TOKENRING, report, call.with_strategy(best))
            rt.auto.put(("kvcache", key, call), found)
        return found.strategy

    # -- plans ------------------------------------------------------------------
    def _plan(self, key: CacheKey, q: torch.Tensor, scale, sharded: bool) -> _CachePlan:
        found = self._plans.get_fresh((key, scale))
        if found is not None:
            return found
        call = self._describe(key, scale)
        problem = cache_refusal(key) if sharded else ""
        rt = runtime()
        lanes = rt.lanes(self.group) if self.world > 1 else None
        if not sharded:  # once per kind: every rank raises alike if they differ
            agree(call, (problem,) if problem else (), q.shape[1], lanes, self._agreed,
                  rt.settings.timeout)  # fmt: skip
        elif problem:  # the key is the same on every rank: so is the refusal
            raise ValueError(f"KVCache.attend: {problem}")
        kernel = self._kernel(call)
        schedule = cache_schedule(key)
        ex = Execution(
            kernel, {GROUP_AXIS: lanes} if lanes is not None else {}, rt.settings.timeout,
            rt.settings.fused_merge, workspace_bytes=rt.settings.workspace_bytes,
        )  # fmt: skip
        plan = _CachePlan(schedule, SlotGeometry(schedule, Pass.FORWARD, call), ex)
        self._plans.put((key, scale), plan)
        return plan

    def _describe(self, key: CacheKey, scale) -> CallDescription:
        """The call as the executor, the agreement and the planner read it: the chunk of
        new tokens over the group."""
        options = Options(
            strategy=key.strategy, layout=Layout.CONTIGUOUS, causal=key.causal,
            softmax_scale=scale, seq_len=key.chunk,
        )  # fmt: skip
        return CallDescription(
            options, self.batch, key.heads_q, self.heads_kv, self.head_dim, self.dtype,
            self.device.type, self.world,
        )  # fmt: skip

    @staticmethod
    def _kernel(call: CallDescription) -> KernelBackend:
        return select_kernel(call.options.kernel, replace(block_spec(call), ragged=True))

    # -- data -------------------------------------------------------------------
    def _key_lengths(self, key: CacheKey, parts, real: torch.Tensor) -> dict[int, torch.Tensor]:
        """The valid tokens per row of every ragged piece: rank ``s``'s cache holds the
        positions ``t < length`` with ``t mod P == s`` (``ceil((length - s) / P)``); a
        chunk part ``[a, b)`` the real tokens that fall in it."""
        P = self.world
        ranks = self._arange(P)[:, None]
        counts = (self.lengths[None, :] - ranks + P - 1).div(P, rounding_mode="floor")
        found = {2 * s: counts[s] for s in range(P)}
        if key.ragged_chunk and not key.appended:
            for s, (a, b) in enumerate(parts):
                found[2 * s + 1] = (real - a).clamp(0, b - a)
        return found

    def _arange(self, n: int) -> torch.Tensor:
        """``arange(n)`` on the cache's device, made once per ``n`` (read every step)."""
        found = self._aranges.get(n)
        if found is None:
            found = self._aranges[n] = torch.arange(n, device=self.device)
        return found

    def _append(self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> None:
        """Write each row's real new tokens that this rank keeps (position ``t`` at local
        index ``t // P`` when ``t mod P`` is this rank), on the device: the others go to
        the last storage row, which nothing reads."""
        P, r = self.world, self.rank
        chunk = k.shape[1]
        x = self._arange(chunk)
        t = self.lengths[:, None] + x[None, :]
        keep = (t % P == r) & (x[None, :] < real[:, None])
        index = torch.where(keep, t.div(P, rounding_mode="floor"), self._k.shape[1] - 1)
        rows = self._arange(self.batch)[:, None].expand_as(index)
        self._k[rows, index] = k
        self._v[rows, index] = v
        self.lengths += real
