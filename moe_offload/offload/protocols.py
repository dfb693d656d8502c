"""The engine's interfaces, written down: what the expert cache needs of a host store and a copy
engine, and what the prefetcher needs of a predictor. Implementations: store.HostExpertStore,
transfer.ThreadCopyEngine / CudaCopyEngine, moe_offload.predict.*, and the simulator's virtual-time
twins in moe_offload.analysis.sim."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

Key = tuple[int, int]  # (layer, expert)


@runtime_checkable
class ExpertStore(Protocol):
    """Host tier: every expert as one contiguous row, so one copy moves one expert."""

    num_layers: int
    num_experts: int
    expert_bytes: int  # bytes one expert moves over the link

    def row(self, layer: int, e: int) -> torch.Tensor:
        """Expert (layer, e) as one contiguous host row."""

    def allocate_pool(self, num_slots: int, device: torch.device) -> torch.Tensor:
        """An uninitialised device pool [S, row] for num_slots experts."""

    def pool_views(self, pool: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(w13 [S, 2I, H], w2 [S, H, I]) views of a pool from allocate_pool, as the kernels read them."""


class LoadHandleLike(Protocol):
    key: Key
    slot: int
    error: BaseException | None

    def done(self) -> bool: ...


@runtime_checkable
class CopyEngine(Protocol):
    """Moves host rows into device slots. load() queues a copy; wait() makes compute wait for it
    (returns the seconds the host stalled, 0 where the wait is on the device); fence(slot) marks that
    compute has used a slot, so no later load overwrites it before that use."""

    def load(self, key: Key, src: torch.Tensor, dst: torch.Tensor, slot: int, prefetch: bool = False,
             priority: float = 0.0) -> LoadHandleLike:
        """Queue a copy. prefetch: nobody waits for it yet (engines with a link scheduler put demand
        loads first); priority: its expected value among prefetches (higher goes first). Engines
        with a link scheduler also offer promote(handle) and cancel(handle) -> unsent bytes | None
        (see offload.link)."""

    def wait(self, handle: LoadHandleLike) -> float: ...

    def fence(self, slot: int) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Predictor(Protocol):
    """Scores over experts for layers ahead, from the residual entering a layer's MoE."""

    name: str
    lookahead: int  # D

    def scores(self, layer: int, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """x [N, H] at layer `layer`, rows at positions start_pos.. -> [N, D, E] scores for layers
        layer+1..layer+D (rows past the last layer are NaN). Runs on x's device; never syncs."""

    def first_layers(self, token_id: int, pos: int, take: int) -> np.ndarray:
        """The top-`take` experts of layers 0..D-1 for token `token_id` at position `pos`, predicted
        before the forward pass reaches them: [D', take] int (host; no device work)."""
