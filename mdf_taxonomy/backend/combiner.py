"""Worker-side fold of several batches' partials into one flush.

Traffic to the bucket actors is then proportional to the clusters touched per
`flush_rows` rows rather than per batch. The fold is int64, so it changes no bit
of the result; the flush id is derived from the ids of the folded batches, so a
retried flush is still recognised.

The fold cannot wrap: the running sums are checked against FIXED_SUM_LIMIT at
least every MAX_ROWS_PER_SUM rows and when flushed, and a sum that reached it is
sent as SUM_OVERFLOWED, which the driver refuses (see model/fitting.py).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from mdf_taxonomy.model.fitting import (
    MAX_ROWS_PER_SUM,
    SUM_OVERFLOWED,
    add_fixed_sums,
    mark_overflowed,
)

if TYPE_CHECKING:  # only flush() talks to the actors; folding needs no Ray
    from mdf_taxonomy.backend.fit_backend import FitBackend


class PartialsCombiner:
    """Several batches' partials folded on the worker, so a flush carries each touched
    cluster once, whatever the number of batches."""

    def __init__(self, pass_id: str, n_nodes: int, dim: int, device: torch.device):
        self.pass_id = pass_id
        self.sums = torch.zeros((n_nodes, dim), dtype=torch.int64, device=device)
        self.counts = torch.zeros(n_nodes, dtype=torch.int64, device=device)
        self.totals: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.flush_ids: list[str] = []
        self._unchecked_rows = 0  # rows added since the sums were last checked

    @property
    def rows(self) -> int:
        return self.totals.get("rows", 0)

    def add(
        self,
        flush_id: str,
        sums: torch.Tensor,
        counts: torch.Tensor,
        totals: dict[str, int],
        rejected: dict[str, int],
    ) -> None:
        """Fold one batch; `totals["rows"]` bounds the rows behind `sums`."""
        rows = int(totals.get("rows", 0))
        if rows > MAX_ROWS_PER_SUM:  # a node's batch sum may have wrapped: refuse it
            sums = sums.clone()
            sums[counts > MAX_ROWS_PER_SUM] = SUM_OVERFLOWED
            add_fixed_sums(self.sums, sums)
            self._unchecked_rows = 0
        else:
            if self._unchecked_rows + rows > MAX_ROWS_PER_SUM:
                mark_overflowed(self.sums)
                self._unchecked_rows = 0
            self.sums += sums  # exact: in-range sums plus fewer than MAX_ROWS_PER_SUM rows
            self._unchecked_rows += rows
        self.counts += counts
        for target, new in ((self.totals, totals), (self.rejected, rejected)):
            for k, v in new.items():
                target[k] = target.get(k, 0) + int(v)
        self.flush_ids.append(flush_id)

    def flush(self, backend: FitBackend) -> int:
        """Send the touched nodes as one flush per bucket; returns the bytes sent."""
        if not self.flush_ids:
            return 0
        nodes = torch.nonzero(self.counts).flatten()
        sums = self.sums[nodes]
        mark_overflowed(sums)
        sent = int(len(nodes) * (self.sums.shape[1] + 2) * 8)
        flush_id = hashlib.blake2b(
            "\n".join(sorted(self.flush_ids)).encode(), digest_size=16
        ).hexdigest()
        backend.add_partials(
            self.pass_id,
            flush_id,
            nodes.cpu().numpy(),
            sums.cpu().numpy(),
            self.counts[nodes].cpu().numpy(),
            {**self.totals, "flush_bytes": sent},
            self.rejected,
        )
        self.sums.zero_()
        self.counts.zero_()
        self.totals, self.rejected, self.flush_ids = {}, {}, []
        self._unchecked_rows = 0
        return sent
