"""PyTorch's built-in context parallel as a benchmark peer.

PyTorch (2.6 onwards; this adapter was checked against the 2.11 and 2.13
sources, whose context-parallel code is the same apart from asserts) runs
``F.scaled_dot_product_attention`` on sequence-sharded DTensors as a ring:
each rank keeps its queries, key/value shards rotate (``"allgather"``: one
all-gather of all of K and V; ``"alltoall"``: a rank-to-next permutation per
step), partial outputs are merged with their log-sum-exp. The backward rotates
K/V the same way and their gradients always with all-to-all. For causal
attention its head-tail load balancer gives rank r chunks r and 2P-1-r (our
zigzag layout); without a causal mask there is no load balancing (contiguous).

Which torch names this uses, all in ``torch.distributed.tensor.experimental.
_attention`` (a private module: the only place PyTorch exposes them):
``_ContextParallel`` (the parallel style whose hooks turn SDPA's inputs into
DTensors sharded on the sequence), ``_enable_context_parallel_dispatcher`` /
``_disable_context_parallel_dispatcher`` (route the SDPA ops to the ring),
``set_rotate_method`` and ``_cp_options.enable_load_balance`` (global options
read on every call, forward *and* backward), ``_HeadTailLoadBalancer`` (to
check our shards match PyTorch's). This is the "module wrapper" path of the
current API: it does not monkey-patch ``F.scaled_dot_product_attention`` and
shards out of place, unlike the older ``context_parallel()`` context manager.
Every global switch is set only inside ``Runner.scope`` and restored after.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tokenring.options import Layout

from .base import Peer, PeerCase, Runner, divisibility_reasons, require_distributed

__all__ = ["ROTATE_METHODS", "TORCH_CP_KERNELS", "TorchContextParallel", "cp_api", "cp_switches"]

ROTATE_METHODS = ("allgather", "alltoall")
"""Values of ``rotate_method`` (PyTorch's ``set_rotate_method``)."""

TORCH_CP_KERNELS = ("auto", "flash", "efficient", "cudnn")
"""Values of ``kernel``: which SDPA backends PyTorch may pick inside the ring.

``"auto"`` allows all three CUDA backends the ring supports and lets PyTorch
choose by its own priority order (what a user gets by default, minus the math
fallback, which context parallel cannot shard).
"""

_KERNEL_DTYPES = {
    "flash": {torch.float16, torch.bfloat16},
    "cudnn": {torch.float16, torch.bfloat16},
    "efficient": {torch.float16, torch.bfloat16, torch.float32},
}

_CP_MODULE = "torch.distributed.tensor.experimental._attention"
_CP_NAMES = (
    "_ContextParallel",
    "_cp_options",
    "_enable_context_parallel_dispatcher",
    "_disable_context_parallel_dispatcher",
    "_HeadTailLoadBalancer",
    "set_rotate_method",
)


def cp_api() -> tuple[ModuleType | None, str | None]:
    """PyTorch's context-parallel module, or None and why it cannot be used."""
    try:
        api = importlib.import_module(_CP_MODULE)
    except ImportError as err:
        return None, f"torch {torch.__version__} has no {_CP_MODULE} ({err})"
    missing = [n for n in _CP_NAMES if not hasattr(api, n)]
    if missing:
        return None, (
            f"torch {torch.__version__}'s {_CP_MODULE} lacks {', '.join(missing)} "
            "(this adapter follows the torch 2.11-2.13 API)"
        )
    return api, None


def _backends(kernel: str) -> list:
    from torch.nn.attention import SDPBackend

    table = {
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
    }
    if kernel == "auto":
        return [*table["cudnn"], *table["flash"], *table["efficient"]]
    return table[kernel]


@contextlib.contextmanager
def cp_switches(
    api: ModuleType, rotate_method: str, load_balance: bool, kernel: str
) -> Iterator[None]:
    """Turn PyTorch context parallel on for this block and restore everything after.

    Sets the rotate method and the load-balance flag (global options that the
    ring reads on every call, forward and backward), routes the SDPA ops to
    the ring (a global DTensor dispatch table) and limits SDPA to the chosen
    backends. Restores all of them even if the block raises.
    """
    from torch.nn.attention import sdpa_kernel

    options = api._cp_options
    saved = (options.rotate_method, options.enable_load_balance)
    try:
        api.set_rotate_method(rotate_method)
        options.enable_load_balance = load_balance
        api._enable_context_parallel_dispatcher()
        try:
            with sdpa_kernel(_backends(kernel)):
                yield
        finally:
            api._disable_context_parallel_dispatcher()
    finally:
        options.rotate_method, options.enable_load_balance = saved


class _Sdpa(nn.Module):
    """``F.scaled_dot_product_attention`` on ``[batch, heads, seq, head_dim]``.

    A module because PyTorch's ``_ContextParallel`` style attaches its hooks
    (inputs to sequence-sharded DTensors, output back to a local tensor) to one.
    """

    def __init__(self, causal: bool, gqa: bool) -> None:
        super().__init__()
        self.causal = causal
        self.gqa = gqa

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.gqa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def _parse(value: str, valid: tuple[str, ...], argument: str) -> str:
    if value not in valid:
        raise ValueError(
            f"unknown {argument} {value!r}; valid values are {', '.join(repr(v) for v in valid)}"
        )
    return value


class TorchContextParallel(Peer):
    """PyTorch context parallel: ``F.scaled_dot_product_attention`` under its ring.

    ``rotate_method``: ``"allgather"`` or ``"alltoall"`` (how K/V shards move).
    ``kernel``: one of ``TORCH_CP_KERNELS``. ``load_balance``: for causal
    attention, use PyTorch's head-tail load balancer (our zigzag layout); False
    runs causal attention on contiguous shards (ranks then skip blocks above
    the diagonal and sit idle). Non-causal attention is always contiguous:
    PyTorch refuses load balancing without a causal mask.
    """

    def __init__(
        self, rotate_method: str = "allgather", *, kernel: str = "auto", load_balance: bool = True
    ) -> None:
        self.rotate_method = _parse(rotate_method, ROTATE_METHODS, "rotate_method")
        self.kernel = _parse(kernel, TORCH_CP_KERNELS, "kernel")
        self.load_balance = bool(load_balance)
        name = f"torch-cp-{self.rotate_method}"
        if self.kernel != "auto":
            name += f"-{self.kernel}"
        if not self.load_balance:
            name += "-no-lb"
        self.name = name

    def describe(self) -> str:
        return (
            f"{self.name}: PyTorch {torch.__version__} context parallel, SDPA ({self.kernel}) "
            f"under its ring, K/V rotated by {self.rotate_method}"
        )

    def _balanced(self, case: PeerCase) -> bool:
        return case.causal and self.load_balance

    def layout(self, case: PeerCase) -> Layout:
        return Layout.ZIGZAG if self._balanced(case) else Layout.CONTIGUOUS

    def case_reasons(self, case: PeerCase) -> list[str]:
        """The reasons that depend on the case alone (not on this installation)."""
        reasons = []
        if case.device_type != "cuda":
            reasons.append(
                "PyTorch context parallel only shards the CUDA SDPA kernels (flash, "
                f"memory-efficient, cuDNN); on {case.device_type} SDPA calls "
                "aten._scaled_dot_product_flash_attention_for_cpu, which has no DTensor "
                "sharding rule"
            )
        allowed = (
            set().union(*_KERNEL_DTYPES.values())
            if self.kernel == "auto"
            else (_KERNEL_DTYPES[self.kernel])
        )
        if case.dtype not in allowed:
            names = sorted(str(d).removeprefix("torch.") for d in allowed)
            reasons.append(
                f"dtype {str(case.dtype).removeprefix('torch.')} not in {names} "
                f"(SDPA kernel {self.kernel!r}; the math fallback cannot be sharded)"
            )
        if self.kernel == "flash" and case.head_dim > 256:
            reasons.append(f"head_dim {case.head_dim} > 256 (flash)")
        reasons += divisibility_reasons(self.layout(case), case)
        return reasons

    def not_supported_reasons(self, case: PeerCase) -> list[str]:
        api, why = cp_api()
        reasons = [] if api is not None else [str(why)]
        return reasons + self.case_reasons(case)

    def check_balancer(self, api: ModuleType, case: PeerCase, rank: int) -> None:
        """Raise if PyTorch's own load balancer would give ``rank`` other tokens than ours."""
        if not self._balanced(case):
            return
        indices = api._HeadTailLoadBalancer(case.seq_len, case.world, "cpu")._generate_indices()
        theirs = indices.reshape(-1).long().chunk(case.world)[rank]
        if not torch.equal(theirs, self.local_positions(case, rank)):
            raise RuntimeError(
                f"torch {torch.__version__}'s head-tail load balancer no longer matches the "
                "zigzag layout this adapter shards with; update tokenring_bench.peers.torch_cp"
            )

    def build(self, case: PeerCase, group: dist.ProcessGroup | None, rank: int) -> Runner:
        require_distributed(self.name)
        api, why = cp_api()
        if api is None:
            raise NotImplementedError(why)
        self.check_balancer(api, case, rank)
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor.parallel import parallelize_module

        pg = group if group is not None else dist.group.WORLD
        mesh = DeviceMesh.from_group(pg, case.device_type)
        style = api._ContextParallel(
            seq_dim=2, attention_type=api._ContextParallel.AttentionType.SDPA
        )
        module = parallelize_module(_Sdpa(case.causal, case.gqa), mesh, style)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # [B, S/P, H, D] shards as the [B, H, S/P, D] views SDPA takes (as a model
            # passes them), and the output back as a [B, S/P, H, D] view.
            out = module(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)

        balanced = self._balanced(case)

        def scope() -> contextlib.AbstractContextManager:
            return cp_switches(api, self.rotate_method, balanced, self.kernel)

        key = ("torch-cp", self.rotate_method, balanced, self.kernel)
        return Runner(run=run, scope=scope, scope_key=key)
