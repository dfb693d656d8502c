"""Per-layer observers of the model's forward pass: the one way anything outside the model (the
prefetcher, trace recording, predictor training, statistics, forced routing in benchmarks) sees or
steers what happens inside it. `MoeModel.observers` is a list of them, called in order."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class LayerObserver(Protocol):
    """Hooks of one forward pass. x and h are [N, H] with N = B*T rows at positions start_pos.."""

    def on_step(self, input_ids: torch.Tensor, start_pos: int, host_ids: Sequence[int] | None) -> None:
        """A forward pass starts. host_ids: the token ids when the caller has them on the host (decode)."""

    def on_residual(self, layer: int, x: torch.Tensor, start_pos: int) -> None:
        """x [N, H]: the residual entering layer `layer`'s MoE (after attention)."""

    def on_routing(self, layer: int, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor,
                   start_pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ids/weights [N, k], logits [N, E]. Return (ids, weights) to replace the routing, else None."""


class Observer:
    """A LayerObserver with no-op hooks: subclass and override what you need. `steers_routing` False
    promises on_routing never replaces the routing (it may then be told after the experts ran, as the
    compiled CPU decode step does); an observer without the attribute is taken to steer."""

    steers_routing = True

    def on_step(self, input_ids: torch.Tensor, start_pos: int, host_ids: Sequence[int] | None) -> None:
        pass

    def on_residual(self, layer: int, x: torch.Tensor, start_pos: int) -> None:
        pass

    def on_routing(self, layer: int, ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor,
                   start_pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


class UsageCounter(Observer):
    """Routed (token, k) assignments per [layer, expert], counted on the device (no host sync)."""

    steers_routing = False

    def __init__(self, num_layers: int, num_experts: int, device: torch.device):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)  # [L, E]

    def on_routing(self, layer, ids, weights, logits, start_pos):
        flat = ids.reshape(-1)
        self.counts[layer].index_add_(0, flat, torch.ones_like(flat))
        return None

    def reset(self) -> None:
        self.counts.zero_()


class ForcedRouting(Observer):
    """Benchmarks: replace the router's choice with recorded routing (ids, weights [T, L, k] on the
    model's device), indexed by position."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor):
        self.ids, self.weights = ids, weights

    def on_routing(self, layer, ids, weights, logits, start_pos):
        n = ids.shape[0]
        return self.ids[start_pos:start_pos + n, layer], self.weights[start_pos:start_pos + n, layer]


class observing:
    """Context manager: attach observers to a model for the duration of a block."""

    def __init__(self, model, *observers: LayerObserver):
        self.model, self.observers = model, observers

    def __enter__(self):
        self.model.observers.extend(self.observers)
        return self

    def __exit__(self, *exc) -> None:
        for ob in self.observers:
            self.model.observers.remove(ob)
