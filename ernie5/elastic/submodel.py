"""A sub-model of the full network: which layers run, which experts may be routed to, and how many per token.

Paddle-free; the model reads the three fields (duck-typed), the sampler, evaluator and exporter build them.
`None` in a field means "as in the full model", so a SubModel with all three None is the full model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DIMS = ("depth", "width", "topk")


@dataclass(frozen=True)
class SubModel:
    layers: Optional[tuple[int, ...]] = None  # kept layer indices, ascending; skipped layers act as identity
    experts: Optional[tuple[int, ...]] = None  # kept expert ids (the same in every MoE layer), ascending
    top_k: Optional[int] = None  # experts per token

    @property
    def cut_dims(self) -> tuple[str, ...]:
        """The dimensions in which this sub-model differs from the full model (empty for the full model)."""
        cut = (self.layers is not None, self.experts is not None, self.top_k is not None)
        return tuple(d for d, c in zip(DIMS, cut) if c)

    @property
    def kind(self) -> str:
        """`full`, or the cut dimensions joined by `_` (`depth`, `width_topk`, ...): the per-kind loss key."""
        return "_".join(self.cut_dims) or "full"

    @property
    def routing_is_full(self) -> bool:
        """Whether routing uses the full expert set and the default k (so the aux-free bias applies)."""
        return self.experts is None and self.top_k is None

    def keeps_layer(self, i: int) -> bool:
        return self.layers is None or i in self.layers

    def normalized(self, num_layers: int, num_experts: int, top_k: int) -> "SubModel":
        """Replace fields that equal the full model's by None (so `kind` and bias handling see no cut)."""
        layers = None if self.layers is None or tuple(self.layers) == tuple(range(num_layers)) else self.layers
        experts = (None if self.experts is None or tuple(self.experts) == tuple(range(num_experts))
                   else self.experts)
        k = None if self.top_k is None or self.top_k == top_k else self.top_k
        return SubModel(layers, experts, k)

    def describe(self, num_layers: int, num_experts: int, top_k: int) -> str:
        """Short label such as `L3/4 E4/8 k1/2`."""
        n_l = num_layers if self.layers is None else len(self.layers)
        n_e = num_experts if self.experts is None else len(self.experts)
        k = top_k if self.top_k is None else self.top_k
        return f"L{n_l}/{num_layers} E{n_e}/{num_experts} k{k}/{top_k}"

    def to_dict(self) -> dict:
        return {"layers": None if self.layers is None else list(self.layers),
                "experts": None if self.experts is None else list(self.experts), "top_k": self.top_k}

    @classmethod
    def from_dict(cls, d: dict) -> "SubModel":
        return cls(None if d.get("layers") is None else tuple(d["layers"]),
                   None if d.get("experts") is None else tuple(d["experts"]), d.get("top_k"))


FULL = SubModel()
