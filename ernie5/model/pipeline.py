"""Pipeline stages: which layers a pipeline rank holds, and which of the model's ends.

Stage s of P holds a contiguous run of blocks (`stage_layers`); the first stage also holds the token embedding
(and the modality inputs), the last the final norm, the text head, the MTP depths and the modality heads. With
tied embeddings the last stage keeps its own copy of the embedding for the head (and MTP's input embeddings);
the two copies start equal and stay equal because their gradients are summed between the first and last stage
(Megatron's treatment), so they take identical optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


def even_sizes(num_layers: int, chunks: int) -> list[int]:
    """Layers per chunk as even as possible; the extra layers go to the last chunks (stage 0 keeps the most
    micro-batches in flight under 1F1B)."""
    return [num_layers // chunks + (1 if c >= chunks - num_layers % chunks else 0) for c in range(chunks)]


def stage_layers(num_layers: int, pipeline: int, virtual: int = 1,
                 sizes: Optional[list[int]] = None) -> list[list[int]]:
    """Layer indices held by each pipeline stage: contiguous chunks of `sizes[c]` layers (None: as even as
    possible) dealt round-robin to the stages (`ernie5.plan.layout` chooses the sizes)."""
    n = pipeline * virtual
    sizes = sizes or even_sizes(num_layers, n)
    starts = [sum(sizes[:c]) for c in range(n)]
    return [[i for c in range(s, n, pipeline) for i in range(starts[c], starts[c] + sizes[c])]
            for s in range(pipeline)]


@dataclass(frozen=True)
class PipelineStage:
    """Pipeline rank `index` of `size`; with interleaving (V > 1) it holds V chunks of layers: local chunk j is
    the model's chunk j * size + index, so a micro-batch visits stage 0, 1, ..., size - 1, then stage 0 again."""

    index: int
    size: int
    layers: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...] = ()  # the layers of each local chunk (empty: one chunk of all `layers`)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.size - 1

    @property
    def virtual(self) -> int:
        return max(len(self.chunks), 1)

    def holds(self, layer: int) -> bool:
        return layer in self.layers

    def chunk_layers(self, chunk: int) -> tuple[int, ...]:
        return self.chunks[chunk] if self.chunks else self.layers

    def starts_model(self, chunk: int) -> bool:
        """Whether `chunk` is the model's first (it embeds the batch)."""
        return self.first and chunk == 0

    def ends_model(self, chunk: int) -> bool:
        """Whether `chunk` is the model's last (the heads and the loss follow it)."""
        return self.last and chunk == self.virtual - 1


def build_stage(num_layers: int, pipeline: int, index: int, virtual: int = 1,
                sizes: Optional[list[int]] = None) -> PipelineStage:
    """Stage `index`'s layers and chunks (`sizes`: layers per chunk, None: even)."""
    n = pipeline * virtual
    sizes = sizes or even_sizes(num_layers, n)
    starts = [sum(sizes[:c]) for c in range(n)]
    chunks = tuple(tuple(range(starts[c], starts[c] + sizes[c])) for c in range(index, n, pipeline))
    return PipelineStage(index, pipeline, tuple(stage_layers(num_layers, pipeline, virtual, sizes)[index]),
                         chunks if virtual > 1 else ())
