"""Router functions: a layer's router logits -> the routed experts and their weights.

One `Routing` describes every router of the supported families and leaves room for the ones to come:
softmax over all experts then top-k (Mixtral, Qwen-MoE, OLMoE); top-k of the logits then a softmax
over those k (GPT-OSS); or a sigmoid per expert with a correction bias that moves the choice but not
the weights, chosen within the best groups of experts (DeepSeek-V3, GLM-4.5); or a softmax whose
top-k is chosen within the groups with the best single experts (DeepSeek-V2's group_limited_greedy).
The k weights are optionally renormalised to sum to one, then scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORINGS = ("softmax", "topk_softmax", "sigmoid")
GROUP_SCORES = ("top2", "max")


@dataclass(frozen=True)
class Routing:
    """logits [N, E] (any float dtype) -> (weights [N, k] float32, ids [N, k] int64).

    scoring: 'softmax' over the E experts; 'topk_softmax': the k largest logits, softmax over them; or
    'sigmoid' per expert. renormalize: divide the k chosen weights by their sum (sigmoid: plus 1e-20).
    n_group / topk_group: the experts form n_group equal groups, each scored by the sum of its two best
    (bias-corrected) scores (group_score 'top2') or by its best one ('max', DeepSeek-V2); the experts
    outside the topk_group best groups cannot be chosen (1 / 1: no grouping). scale: the weights' final
    factor (routed_scaling_factor).
    A bias [E] passed to the call (the layer's correction bias) is added to the scores for the choice
    only; the weights are the uncorrected scores of the chosen experts (DeepSeek-V3's rule).
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    group_score: str = "top2"

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"routing scoring {self.scoring!r} is not one of {list(SCORINGS)}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"routing group_score {self.group_score!r} is not one of {list(GROUP_SCORES)}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"routing: topk_group {self.topk_group} must be in 1..n_group ({self.n_group})")

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scoring == "topk_softmax":
            top, ids = torch.topk(logits.float(), self.top_k, dim=-1)  # [N, k]
            weights = torch.softmax(top, dim=-1)
            return (weights * self.scale if self.scale != 1.0 else weights), ids
        if self.scoring == "softmax":
            scores = torch.softmax(logits.float(), dim=-1)  # [N, E]
        else:
            scores = torch.sigmoid(logits.float())
        if bias is None and self.n_group == 1:
            weights, ids = torch.topk(scores, self.top_k, dim=-1)  # [N, k]
        else:
            ids = torch.topk(self._choice(scores, bias), self.top_k, dim=-1).indices  # [N, k]
            weights = scores.gather(1, ids)
        if self.renormalize:
            total = weights.sum(dim=-1, keepdim=True)
            weights = weights / (total + 1e-20 if self.scoring == "sigmoid" else total)
        if self.scale != 1.0:
            weights = weights * self.scale
        return weights, ids

    def choice_scores(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """logits [N, E] -> scores [N, E] float32 whose top_k are the experts __call__ routes to (ties
        aside): the softmax, the logits (topk_softmax), or the bias-corrected sigmoid with the experts
        outside the best groups at -inf. What a predictor ranks experts by."""
        x = logits.float()
        if self.scoring == "topk_softmax":
            return x
        scores = torch.softmax(x, dim=-1) if self.scoring == "softmax" else torch.sigmoid(x)
        return scores if bias is None and self.n_group == 1 else self._choice(scores, bias)

    def _choice(self, scores: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        choice = scores if bias is None else scores + bias.float()  # [N, E]
        return self._eligible(choice) if self.n_group > 1 else choice

    def _eligible(self, choice: torch.Tensor) -> torch.Tensor:
        """choice [..., E] with the experts outside the topk_group best groups set to -inf (transformers'
        rule: an eligible expert with a negative corrected score still beats an ineligible one)."""
        e = choice.shape[-1]
        groups = choice.reshape(*choice.shape[:-1], self.n_group, e // self.n_group)  # [..., G, E/G]
        if self.group_score == "max":
            group_scores = groups.amax(dim=-1)  # [..., G]
        else:
            group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)  # [..., G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(-1, group_scores.topk(self.topk_group, dim=-1).indices, True)  # [..., G]
        return groups.masked_fill(~keep[..., None], float("-inf")).reshape(choice.shape)
