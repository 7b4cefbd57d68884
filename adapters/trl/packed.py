"""TRL's packed loss terms as pgzoo's ``[B, T]`` rows.

TRL's ``AsyncGRPOTrainer`` folds a process's samples into one packed row (a prefix trie: a token several samples
share is forwarded once) and takes its loss over a flat list of M terms, one per trained token, each carrying
``segment_id``: which sample of the row it belongs to. A sample's terms appear in token order. pgzoo's objectives
take one row per sequence, so the terms are laid out as ``[B, T]``, B the samples with at least one term (in
``segment_id`` order) and T the most terms of one sample; a term keeps its gradient path through the layout.
Masked-out gaps (tool output between turns) are dropped by TRL's packing; only counted tokens reach the row, which
changes no objective (they all reduce over counted tokens) and keeps T at the longest sample's trained tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedLayout:
    """Where each of M packed loss terms goes in a ``[num_rows, width]`` layout (``rows``/``cols``: ``[M]`` long)."""

    rows: torch.Tensor
    cols: torch.Tensor
    num_rows: int
    width: int

    @classmethod
    def of(cls, segment_id: torch.Tensor) -> PackedLayout:
        """The layout of terms whose samples are ``segment_id`` (``[M]``; any ids, terms of a sample in order)."""
        if segment_id.numel() == 0:
            empty = segment_id.new_zeros(0, dtype=torch.long)
            return cls(empty, empty, 0, 0)
        ids, rows = torch.unique(segment_id, return_inverse=True)  # sorted ids -> compact row numbers
        order = torch.sort(rows, stable=True).indices
        counts = torch.bincount(rows, minlength=ids.numel())
        starts = torch.cumsum(counts, 0) - counts
        cols = torch.empty_like(rows)
        cols[order] = torch.arange(rows.numel(), device=rows.device) - starts[rows[order]]
        return cls(rows, cols, int(ids.numel()), int(counts.max()))  # one host sync

    def rows_of(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[num_rows, width]``: ``values`` (``[M]``) at their places, ``fill`` elsewhere; differentiable."""
        out = values.new_full((self.num_rows, self.width), fill)
        return out.index_put((self.rows, self.cols), values)

    def mask(self) -> torch.Tensor:
        """``[num_rows, width]`` bool: where a term is."""
        out = torch.zeros((self.num_rows, self.width), dtype=torch.bool, device=self.rows.device)
        return out.index_put((self.rows, self.cols), torch.ones_like(self.rows, dtype=torch.bool))

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """``[num_rows]``: the value of each row's first term (for a per-sample quantity TRL stamps on every term)."""
        first = self.cols == 0
        out = values.new_zeros(self.num_rows)
        return out.index_put((self.rows[first],), values[first])


def packed_counts(segment_id: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """``[2]`` long: samples with at least one loss term, and loss terms, of one process's packed micro-batch.

    ``segment_id``/``token_index`` as TRL's collator pads them (``token_index`` -1 past the row's terms)."""
    selected = token_index >= 0
    terms = selected.sum()
    samples = torch.unique(segment_id[selected]).numel()
    return torch.stack([torch.as_tensor(samples, device=terms.device), terms]).long()


__all__ = ["PackedLayout", "packed_counts"]
