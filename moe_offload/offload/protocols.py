"""The engine's interfaces, written down: what the expert cache needs of a host store and a copy
engine, and what the prefetcher needs of a predictor. Implementations: store.HostExpertStore,
transfer.ThreadCopyEngine / cuda_link.CudaLinkEngine, moe_offload.predict.*, and the simulator's virtual-time
twins in moe_offload.analysis.sim."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

Key = tuple[int, int]  # (layer, expert)


@runtime_checkable
class ExpertStore(Protocol):
    """Host tier: every expert as one contiguous row (or, read in place from a memory-mapped file, the
    row's contiguous pieces: rows.Segments), so one copy moves one expert."""

    num_layers: int
    num_experts: int
    expert_bytes: int  # bytes one expert moves over the link

    def row(self, layer: int, e: int) -> Any:
        """Expert (layer, e) as one contiguous host row (a tensor or a rows.Segments)."""

    def allocate_pool(self, num_slots: int, device: torch.device) -> torch.Tensor:
        """An uninitialised device pool [S, row] for num_slots experts."""

    def pool_views(self, pool: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        """(w13 [S, 2I, H], w2 [S, H, I]) views of a pool from allocate_pool, as the kernels read them
        (for a packed expert format: the format's kernels.WeightPool and None)."""


@runtime_checkable
class HostComputeStore(ExpertStore, Protocol):
    """A store whose experts can also run on the host (the CPU lane)."""

    dtype: torch.dtype  # the compute dtype
    hidden: int

    def cpu_expert(self, layer: int, e: int) -> Any:
        """Expert (layer, e) prepared for the host: ffn(0, x [n, H]) -> [n, H]; extra_bytes of RAM held."""


class LoadHandleLike(Protocol):
    key: Key
    slot: int
    error: BaseException | None

    def done(self) -> bool: ...


class CopyEngine(ABC):
    """Moves host rows into device slots over one link (offload.link's scheduler): demand loads first,
    then prefetches by expected value, in chunks so a demand load overtakes queued prefetches.

    Every method the expert cache, the prefetcher and the CPU lane call is here; implementations:
    transfer.ThreadCopyEngine (cpu), cuda_link.CudaLinkEngine (cuda), analysis.sim.SimCopyEngine
    (virtual time). `retries` counts copies tried again after a transient failure."""

    retries: int = 0

    @abstractmethod
    def load(self, key: Key, src: torch.Tensor, dst: torch.Tensor, slot: int, prefetch: bool = False,
             priority: float = 0.0) -> LoadHandleLike:
        """Queue a copy. prefetch: nobody waits for it yet (demand loads go first); priority: its
        expected value among prefetches (higher goes first)."""

    @abstractmethod
    def wait(self, handle: LoadHandleLike) -> float:
        """Make compute wait for the load; the seconds the host stalled (0 where the wait is on the device)."""

    @abstractmethod
    def fence(self, slot: int) -> None:
        """Compute has used `slot`: no later load overwrites it before that use."""

    @abstractmethod
    def promote(self, handle: LoadHandleLike) -> None:
        """Someone now waits for this queued prefetch: it moves with the demand loads."""

    @abstractmethod
    def reprioritize(self, handle: LoadHandleLike, priority: float) -> None:
        """A queued prefetch's expected value changed."""

    @abstractmethod
    def cancel(self, handle: LoadHandleLike) -> int | None:
        """Drop a queued prefetch: its unsent bytes, or None when it can no longer be cancelled."""

    @abstractmethod
    def bytes_before_landing(self, handle: LoadHandleLike) -> int | None:
        """Bytes of link time before this load lands if it were needed now; None once it landed."""

    @property
    @abstractmethod
    def demand_wait_bytes(self) -> int:
        """The most prefetch bytes a demand load can wait behind (what is already on the link)."""

    def drain_stalls(self) -> list[tuple[int, float]]:
        """(layer, seconds compute waited) of late copies measured since the last call (device-side
        waits are measured afterwards; host-side engines report through wait())."""
        return []

    def drain(self) -> None:
        """Wait until no copy is in flight (error recovery only; may sync the host)."""

    def close(self) -> None:
        """Stop the engine after the queued copies; idempotent."""


@runtime_checkable
class Predictor(Protocol):
    """Scores over experts for layers ahead, from the residual entering a layer's MoE."""

    name: str
    lookahead: int  # D
    cross_token: bool  # scores past the last layer are the next token's layers

    def observe(self, layer: int, x: torch.Tensor, start_pos: int) -> None:
        """Every residual entering a layer's MoE, in order (a predictor reading earlier positions keeps
        its state here; others do nothing)."""

    def scores(self, layer: int, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """x [N, H] at layer `layer`, rows at positions start_pos.. -> [N, D, E] scores for layers
        layer+1..layer+D (rows past the last layer are NaN). Runs on x's device; never syncs."""

    def first_layers(self, token_id: int, pos: int, take: int) -> np.ndarray:
        """The top-`take` experts of layers 0..D-1 for token `token_id` at position `pos`, predicted
        before the forward pass reaches them: [D', take] int (host; no device work)."""
