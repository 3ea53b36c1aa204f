"""Size-capped assignment: at most `capacity` rows in each node of one level.

The rule is deferred acceptance with the rows proposing. A row keeps its path above
`level` and ranks its parent's children: the child it is labelled with first, then the
others by key. A child keeps the `capacity` proposers of smallest key and rejects the
rest, which propose to their next child. The outcome, the rows-optimal stable
assignment, is unique whatever order the rows propose in, so it depends on the data
and the tree alone. A row's key at a child is its float32 distance to the child,
computed row by row in float64 (`kernels.rowwise`, so not batch-dependent), then its
content hash. Rows with equal keys at a child (identical rows) stand or fall together,
so such a child can end below capacity.

Streamed, the state is one threshold per node: a row sits at the first child in its
order whose threshold is above the row's key there. A pass counts each node's rows and,
for the nodes over capacity or already cut, a histogram of their keys within a bracket.
After the pass, the threshold of a node over capacity drops to the upper edge of the bin
holding its (capacity+1)-th key, or to that key once the bin is one key wide. It then
rejects only rows that deferred acceptance rejects too. Counts and histograms add up
over batches and workers, so any split gives the same thresholds. The passes stop when
no node is over capacity. A parent with more rows than capacity x its children cannot
be capped; the error names it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch

from mdf_taxonomy import kernels
from mdf_taxonomy.kernels import rowwise
from mdf_taxonomy.model.sampling import sample_priorities
from mdf_taxonomy.model.storage import write_json
from mdf_taxonomy.model.taxonomy import Labels, Taxonomy

#: Keys below it are accepted by a node nobody has cut (every key is: the top bit is 0).
OPEN = np.iinfo(np.int64).max
#: The hash salt of the keys' tie-break, apart from the fit's and sampling's.
CAPACITY_SALT = 2**20 + 7
#: Histogram cells held per pass over all watched nodes (int64 each).
HISTOGRAM_BUDGET = 2**24
MAX_BINS, MIN_BINS = 4096, 16
#: Rows x children x dim of float64 work per block when ranking siblings.
SIBLING_BLOCK = 2**22
PLAN_FORMAT, PLAN_FORMAT_VERSION = "mdf_taxonomy.capacity_plan", 1


def plan_snapshot(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The snapshot a saved capacity plan was made with; ValueError naming the file when
    it is not a capacity plan."""
    return _read_plan(uri, storage_options)["snapshot"]


def _read_plan(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    with fsspec.open(uri, "r", **(storage_options or {})) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}: not a capacity plan ({e})") from None
    if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
        raise ValueError(f"{uri}: not a capacity plan (format {PLAN_FORMAT!r} expected)")
    if d.get("format_version") != PLAN_FORMAT_VERSION:
        raise ValueError(f"{uri}: capacity plan format_version {d.get('format_version')}")
    return d


def check_capacity(tax: Taxonomy, capacity: int, level: int | None) -> int:
    """The level to cap (None: the leaves); ValueError naming a bad capacity or level."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity={capacity!r}: must be an int >= 1")
    level = tax.n_levels if level is None else level
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= tax.n_levels:
        raise ValueError(f"level={level!r}: must be an int in [1, {tax.n_levels}]")
    return level


def keys_at(x: torch.Tensor, c64: torch.Tensor, nodes: torch.Tensor, metric: str, tie: np.ndarray):
    """(N,) int64 key of each prepared row at node `nodes[i]`: distance bits, then hash."""
    d = rowwise.distance(x, c64, nodes, metric).cpu().numpy()
    bits = np.where(d > 0, d, np.float32(0)).astype(np.float32).view(np.int32).astype(np.int64)
    return (bits << 32) | tie


@dataclass
class Placement:
    """Where a batch's rows sit under the current thresholds (-1: no child has room)."""

    parents: np.ndarray  # (N,) int64 node of level - 1 (0 at level 1)
    labelled: np.ndarray  # (N,) int64 the child the tree labels the row with
    nodes: np.ndarray  # (N,) int64 the child the row sits at, or -1
    keys: np.ndarray  # (N,) int64 the row's key there
    paths: np.ndarray  # (N, level - 1) int32 the path above `level`
    labels: Labels  # the uncapped labels down to `level`
    rows: np.ndarray  # the float32 rows placed


@dataclass
class Tally:
    """What one pass saw, additive over batches (`add`)."""

    counts: np.ndarray
    lowest: np.ndarray
    highest: np.ndarray
    histogram: np.ndarray  # (n_watched, bins + 2): under, bins, over
    parent_rows: np.ndarray
    unplaced: int = 0

    def add(self, other: Tally) -> None:
        self.counts += other.counts
        np.minimum(self.lowest, other.lowest, out=self.lowest)
        np.maximum(self.highest, other.highest, out=self.highest)
        self.histogram += other.histogram
        self.parent_rows += other.parent_rows
        self.unplaced += other.unplaced


@dataclass
class CapacityPlan:
    """The thresholds of one capped level and the brackets of the next pass's histograms."""

    tax: Taxonomy
    capacity: int
    level: int
    thresholds: np.ndarray = field(init=False)
    watched: np.ndarray = field(init=False)  # node ids histogrammed next pass
    low: np.ndarray = field(init=False)  # their brackets [low, high)
    high: np.ndarray = field(init=False)
    passes: int = 0
    cut: int = 0  # threshold drops so far

    def __post_init__(self) -> None:
        self.level = check_capacity(self.tax, self.capacity, self.level)
        lv = self.tax.levels[self.level - 1]
        self.thresholds = np.full(lv.n_nodes, OPEN, np.int64)
        self.watched = np.zeros(0, np.int64)
        self.low = self.high = np.zeros(0, np.int64)
        n_parents = 1 if self.level == 1 else self.tax.levels[self.level - 2].n_nodes
        self.offsets = lv.child_offsets(n_parents).astype(np.int64)
        self.c64 = torch.from_numpy(lv.centroids).double()

    @property
    def bins(self) -> int:
        return int(np.clip(HISTOGRAM_BUDGET // max(1, len(self.watched)), MIN_BINS, MAX_BINS))

    def place(
        self, x: np.ndarray, assigner: kernels.Assigner | None = None, device: str = "cpu"
    ) -> Placement:
        """Each valid float32 row's node under the current thresholds."""
        tax, level = self.tax, self.level
        labels = tax.assign_paths(x, upto=level, assigner=assigner, device=device)
        labelled = labels.paths[:, -1].astype(np.int64)
        parents = labels.paths[:, -2].astype(np.int64) if level > 1 else np.zeros_like(labelled)
        prepared = tax.prepare(x, "cpu")
        tie = (sample_priorities(x, 0, CAPACITY_SALT) >> np.uint64(32)).astype(np.int64)
        keys = keys_at(prepared, self.c64, torch.from_numpy(labelled), tax.config.metric, tie)
        nodes = labelled.copy()
        moved = np.flatnonzero(keys >= self.thresholds[labelled])
        if moved.size:
            nodes[moved], keys[moved] = self._next_child(prepared, parents, labelled, tie, moved)
        return Placement(parents, labelled, nodes, keys, labels.paths[:, :-1], labels, x)

    def _next_child(self, x, parents, labelled, tie, rows):
        """For rows their labelled child rejects: the sibling of smallest key with room."""
        lo, hi = self.offsets[parents[rows]], self.offsets[parents[rows] + 1]
        width = int((hi - lo).max())
        best_node = np.full(len(rows), -1, np.int64)
        best_key = np.full(len(rows), OPEN, np.int64)
        step = max(1, SIBLING_BLOCK // max(1, width * x.shape[1]))
        for r0 in range(0, len(rows), step):
            sl = slice(r0, r0 + step)
            r, a, b = rows[sl], lo[sl], hi[sl]
            child = a[:, None] + np.arange(width)[None, :]
            exists = child < b[:, None]
            child = np.where(exists, child, a[:, None])
            flat = torch.from_numpy(child.reshape(-1))
            xs = x[torch.from_numpy(np.repeat(r, width))]
            k = keys_at(xs, self.c64, flat, self.tax.config.metric, np.repeat(tie[r], width))
            k = k.reshape(len(r), width)
            room = exists & (child != labelled[r][:, None]) & (k < self.thresholds[child])
            k = np.where(room, k, OPEN)
            j = k.argmin(axis=1)  # smallest key; on equal keys the lower child id
            got = k[np.arange(len(r)), j] < OPEN
            best_node[sl] = np.where(got, child[np.arange(len(r)), j], -1)
            best_key[sl] = k[np.arange(len(r)), j]
        return best_node, best_key

    def tally(self, placement: Placement) -> Tally:
        """One batch's counts, key range and histograms under the current thresholds."""
        n_nodes, nodes, keys = len(self.thresholds), placement.nodes, placement.keys
        ok = nodes >= 0
        nodes, keys = nodes[ok], keys[ok]
        lowest = np.full(n_nodes, OPEN, np.int64)
        highest = np.full(n_nodes, -1, np.int64)
        np.minimum.at(lowest, nodes, keys)
        np.maximum.at(highest, nodes, keys)
        bins = self.bins
        histogram = np.zeros((len(self.watched), bins + 2), np.int64)
        slot = np.full(n_nodes, -1, np.int64)
        slot[self.watched] = np.arange(len(self.watched))
        seen = slot[nodes] >= 0
        if seen.any():
            s, k = slot[nodes[seen]], keys[seen]
            lo, width = self.low[s], self._width(s, bins)
            cell = np.where(k < lo, 0, np.minimum((k - lo) // width + 1, bins + 1))
            cell = np.where(k >= self.high[s], bins + 1, cell)
            np.add.at(histogram, (s, cell), 1)
        n_parents = len(self.offsets) - 1
        return Tally(
            np.bincount(nodes, minlength=n_nodes),
            lowest,
            highest,
            histogram,
            np.bincount(placement.parents, minlength=n_parents),
            int((~ok).sum()),
        )

    def empty_tally(self) -> Tally:
        n_nodes, n_parents = len(self.thresholds), len(self.offsets) - 1
        return Tally(
            np.zeros(n_nodes, np.int64),
            np.full(n_nodes, OPEN, np.int64),
            np.full(n_nodes, -1, np.int64),
            np.zeros((len(self.watched), self.bins + 2), np.int64),
            np.zeros(n_parents, np.int64),
        )

    def _width(self, s: np.ndarray, bins: int) -> np.ndarray:
        return np.maximum(1, -(-(self.high[s] - self.low[s]) // bins))

    def update(self, t: Tally) -> bool:
        """Lower the thresholds after a pass; True when no node is over capacity."""
        self.passes += 1
        if self.passes == 1:
            self._check_feasible(t.parent_rows)
        cap, bins = self.capacity, self.bins
        bracket = {
            int(n): (int(a), int(b))
            for n, a, b in zip(self.watched, self.low, self.high, strict=True)
        }
        rows = {int(n): i for i, n in enumerate(self.watched)}
        done = not (t.counts > cap).any()
        next_watch = {}
        for node in np.flatnonzero((t.counts > cap) | (self.thresholds < OPEN)):
            node = int(node)
            if t.counts[node] <= cap:  # cut before and full: watch what still arrives
                if t.counts[node]:
                    next_watch[node] = (int(t.lowest[node]), int(self.thresholds[node]))
                continue
            if node not in rows:  # first time over: histogram its key range next pass
                next_watch[node] = (int(t.lowest[node]), int(t.highest[node]) + 1)
                continue
            lo, hi = bracket[node]
            h = t.histogram[rows[node]]
            width = max(1, -(-(hi - lo) // bins))
            before = np.concatenate([[0], np.cumsum(h)])  # rows below cell i
            j = int(np.searchsorted(before[1:], cap + 1))  # the cell of the (cap+1)-th key
            edge = lo if j == 0 else min(lo + (j - 1) * width, hi)
            if j == 0:  # below the bracket
                new, watch = lo, (int(t.lowest[node]), lo)
            elif j == bins + 1:  # above it
                new, watch = self.thresholds[node], (hi, int(t.highest[node]) + 1)
            elif before[j] == cap or width == 1:  # exact: reject from this cell on
                new, watch = edge, (int(t.lowest[node]), edge)
            else:
                new, watch = min(edge + width, hi), (edge, min(edge + width, hi))
            if new < self.thresholds[node]:
                self.thresholds[node] = new
                self.cut += 1
            next_watch[node] = watch
        order = sorted(next_watch)
        self.watched = np.array(order, np.int64)
        self.low = np.array([next_watch[n][0] for n in order], np.int64)
        self.high = np.array([next_watch[n][1] for n in order], np.int64)
        return done

    def save(self, uri: str, storage_options: dict[str, Any] | None = None) -> str:
        """Write the settled thresholds as JSON to `uri` (any fsspec URI), so an MDF
        labeller (TaxonomyPathRefiner's capacity_plan) puts rows where this run did."""
        plan = {
            "format": PLAN_FORMAT,
            "format_version": PLAN_FORMAT_VERSION,
            "snapshot": self.tax.version,
            "level": self.level,
            "capacity": self.capacity,
            "thresholds": self.thresholds.tolist(),
        }
        return write_json(uri, plan, storage_options)

    @classmethod
    def load(
        cls, uri: str, tax: Taxonomy, storage_options: dict[str, Any] | None = None
    ) -> CapacityPlan:
        """A saved plan for `tax`; ValueError naming the file when it is not a capacity
        plan or was made for another snapshot or level shape."""
        d = _read_plan(uri, storage_options)
        plan = cls(tax, d["capacity"], d["level"])
        if d["snapshot"] != tax.version or len(d["thresholds"]) != len(plan.thresholds):
            raise ValueError(
                f"{uri}: capacity plan for snapshot {d['snapshot']} "
                f"({len(d['thresholds'])} nodes at level {d['level']}), taxonomy is snapshot "
                f"{tax.version} ({len(plan.thresholds)} nodes)"
            )
        plan.thresholds = np.asarray(d["thresholds"], np.int64)
        return plan

    def _check_feasible(self, parent_rows: np.ndarray) -> None:
        room = np.diff(self.offsets) * self.capacity
        bad = np.flatnonzero(parent_rows > room)
        if bad.size:
            shown = ", ".join(
                f"node {int(p)} of level {self.level - 1}: {int(parent_rows[p])} rows, "
                f"{int(room[p] // self.capacity)} children"
                for p in bad[:5]
            )
            raise ValueError(
                f"capacity={self.capacity} cannot hold level {self.level}: {bad.size} "
                f"parent(s) have more rows than capacity x children ({shown}); raise the "
                "capacity or refit with max_node_size <= capacity"
            )

    def labels(
        self,
        placement: Placement,
        assigner: kernels.Assigner | None = None,
        device: str = "cpu",
    ) -> Labels:
        """The capped rows' labels: the path above `level`, the capped node, the levels
        below walked again from it (the distance and margin of the deepest level). A row
        no child took (tied identical rows, module doc) keeps its labelled child; the
        margin of a moved row is NaN."""
        tax, level = self.tax, self.level
        nodes = np.where(placement.nodes >= 0, placement.nodes, placement.labelled)
        kept = nodes == placement.labelled
        distance = placement.labels.distance.copy()
        margin = np.where(kept, placement.labels.margin, np.float32(np.nan))
        moved = ~kept
        if moved.any():  # the key's distance is the labelled one's kind: squared for l2
            d = (placement.keys[moved] >> 32).astype(np.int32).view(np.float32)
            distance[moved] = np.sqrt(d) if tax.config.metric == "l2" else d
        paths = np.concatenate([placement.paths, nodes[:, None].astype(np.int32)], axis=1)
        if level == tax.n_levels:
            return Labels(paths, distance, margin.astype(np.float32))
        below = _walk_below(tax, placement.rows, nodes, level, assigner, device)
        return Labels(np.concatenate([paths, below.paths], axis=1), below.distance, below.margin)


def _walk_below(
    tax: Taxonomy, x: np.ndarray, nodes: np.ndarray, level: int, assigner, device: str
) -> Labels:
    """The levels under `level` for rows that sit at `nodes` there, as `assign_paths`."""
    prepared = tax.prepare(x, device)
    last = kernels.Assignment(torch.from_numpy(nodes).to(prepared.device), None, None)
    ids = []
    for lvl in range(level + 1, tax.n_levels + 1):
        last = tax.assign_level(prepared, last.ids, lvl, assigner, with_second=lvl == tax.n_levels)
        ids.append(last.ids)
    distance = last.distance.float().cpu().numpy()
    second = last.second.float().cpu().numpy()
    if tax.config.metric == "l2":
        distance, second = (np.sqrt(np.maximum(d, 0.0)) for d in (distance, second))
    with np.errstate(invalid="ignore"):
        margin = (second - distance).astype(np.float32)
    paths = torch.stack(ids, 1).to(torch.int32).cpu().numpy()
    return Labels(paths, distance.astype(np.float32), margin)


def capped_labels(
    tax: Taxonomy,
    batches: Callable[[], Iterable[np.ndarray]],
    capacity: int,
    level: int | None = None,
    assigner: kernels.Assigner | None = None,
    device: str = "cpu",
    max_passes: int = 64,
    progress: Callable[[CapacityPlan, Tally], Any] | None = None,
) -> tuple[CapacityPlan, list[Labels]]:
    """Settle the thresholds over `batches()` (called once per pass; valid float32 rows),
    then the capped labels of every batch, in order."""
    plan = CapacityPlan(tax, capacity, level)
    settle(plan, lambda: (plan.place(x, assigner, device) for x in batches()), max_passes, progress)
    return plan, [plan.labels(plan.place(x, assigner, device), assigner, device) for x in batches()]


def settle(
    plan: CapacityPlan,
    placements: Callable[[], Iterable[Placement]],
    max_passes: int = 64,
    progress: Callable[[CapacityPlan, Tally], Any] | None = None,
) -> CapacityPlan:
    """Counting passes until no node of the plan's level is over capacity."""
    while True:
        total = plan.empty_tally()
        for placement in placements():
            total.add(plan.tally(placement))
        done = plan.update(total)
        if progress is not None:
            progress(plan, total)
        if done:
            return plan
        if plan.passes >= max_passes:
            over = int((total.counts > plan.capacity).sum())
            raise RuntimeError(
                f"capacity={plan.capacity}: {over} node(s) of level {plan.level} still over "
                f"capacity after {plan.passes} passes (max_passes)"
            )
