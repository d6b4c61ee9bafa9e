"""Precedence between requests: the workflow DAG, its validation, and longest paths over it.

A request may name *predecessors* (``after = ["id", ...]`` in a spec's ``[[requests]]``, or
``Workload.from_arrays(..., after=...)``); it can start only when every one of them has finished.
Its *ready time* is the latest predecessor finish, or its own arrival if that is later.

:class:`Precedence` is the validated graph of one workload, in row indices: the edges, their
compressed successor and predecessor lists, and the topological generations (levels) that
``networkx`` computes once. Path computations run over the levels with numpy, so a critical path of
100k requests takes milliseconds:

* :meth:`Precedence.earliest_start` -- ``start_r = max(release_r, max_{q -> r} start_q + d_q)``, the
  head of every request (the longest path ending at it, arrivals included);
* :meth:`Precedence.tails` -- ``tail_r = max_{r -> s} (d_s + tail_s)``, the longest path after it;
* :meth:`Precedence.critical_path` -- the longest path itself (length and rows);
* :meth:`Precedence.upward_rank` -- HEFT's upward rank, the priority the hybrid dispatches by.

Validation (all before any work): an unknown id, a request naming itself, a predecessor named twice
and a cycle are each a :class:`~lloptim.errors.PrecedenceError` that names the ids involved (the
cycle as ``a -> b -> c -> a``, found by ``networkx.find_cycle``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from lloptim.errors import CycleError, PrecedenceError

__all__ = ["Precedence", "parse_after"]


def _as_id_list(entry: Any) -> list[str]:
    """The predecessor ids of one request: None/empty -> [], one id -> [id], an iterable -> its ids."""
    if entry is None:
        return []
    if isinstance(entry, (str, int, np.integer)):
        return [str(entry)]
    return [str(x) for x in entry]


def parse_after(after: Sequence | Mapping, ids: Sequence[str]) -> np.ndarray:
    """Edges ``(predecessor row, successor row)`` from each request's predecessor ids.

    Parameters
    ----------
    after
        One entry per request (None or an empty list for none; an id, or a list of ids), or a
        mapping ``id -> predecessor ids`` for the requests that have predecessors. Ids compare as
        strings, like :attr:`~lloptim.problem.Workload.ids`.
    ids
        The requests' ids, one per row.

    Returns
    -------
    numpy.ndarray
        ``(E, 2)`` int64 edges, ordered by successor row then as listed.

    Raises
    ------
    PrecedenceError
        A wrong number of entries, an unknown id, a request naming itself or a predecessor twice.
    """
    n = len(ids)
    row_of = {x: i for i, x in enumerate(ids)}
    if isinstance(after, Mapping):
        entries: list[Any] = [None] * n
        for key, value in after.items():
            k = str(key)
            if k not in row_of:
                raise PrecedenceError("after", f"has predecessors for unknown request id {k!r}",
                                      "key the mapping by ids of the workload's requests", ids=(k,))
            entries[row_of[k]] = value
    else:
        entries = list(after)
        if len(entries) != n:
            raise PrecedenceError("after", f"has {len(entries)} entries for {n} requests",
                                  "give one list of predecessor ids per request (empty for none)")
    src: list[int] = []
    dst: list[int] = []
    for i, entry in enumerate(entries):
        names = _as_id_list(entry)
        if not names:
            continue
        seen: set[str] = set()
        for x in names:
            j = row_of.get(x)
            if j is None:
                raise PrecedenceError(f"requests[{i}].after", f"names unknown request id {x!r}",
                                      "name the id of another request of this workload", ids=(x,))
            if j == i:
                raise PrecedenceError(f"requests[{i}].after", f"request {x!r} names itself as its predecessor",
                                      "remove its own id from its after list", ids=(x,))
            if x in seen:
                raise PrecedenceError(f"requests[{i}].after", f"names predecessor {x!r} twice",
                                      "list each predecessor once", ids=(x,))
            seen.add(x)
            src.append(j)
            dst.append(i)
    return np.column_stack([np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)])


@dataclass(frozen=True, eq=False)
class Precedence:
    """The validated precedence DAG of a workload, in request rows.

    Build it with :meth:`from_edges` (or through ``Workload.from_arrays(..., after=...)``); the
    constructor trusts its arguments.

    Attributes
    ----------
    n
        Number of requests (rows ``0 .. n-1``; rows without edges are isolated nodes).
    edges
        ``(E, 2)`` int64 array of ``(predecessor, successor)`` rows, read-only.
    level
        Topological generation of each request (int64): 0 for requests without predecessors,
        else one more than the deepest predecessor's.
    """

    n: int
    edges: np.ndarray
    level: np.ndarray

    # -- construction and validation ---------------------------------------------------------------
    @classmethod
    def from_edges(cls, n: int, edges: np.ndarray, ids: Sequence[str] | None = None) -> "Precedence":
        """Validate ``edges`` over ``n`` requests and build the DAG.

        Parameters
        ----------
        n
            Number of requests.
        edges
            ``(E, 2)`` array of ``(predecessor row, successor row)``.
        ids
            Request ids for the messages (default: the rows as strings).

        Raises
        ------
        PrecedenceError
            A row out of range, a self-loop or a repeated edge.
        CycleError
            The edges contain a cycle; its ids are in the message and in ``.cycle``.
        """
        ids = [str(i) for i in range(n)] if ids is None else list(ids)
        e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
        bad = np.flatnonzero((e < 0).any(axis=1) | (e >= n).any(axis=1))
        if bad.size:
            raise PrecedenceError("after", f"edge {e[bad[0]].tolist()} names a row outside 0..{n - 1}",
                                  "give row indices of the workload's requests")
        loops = np.flatnonzero(e[:, 0] == e[:, 1])
        if loops.size:
            x = ids[int(e[loops[0], 0])]
            raise PrecedenceError(f"requests[{int(e[loops[0], 1])}].after",
                                  f"request {x!r} names itself as its predecessor",
                                  "remove its own id from its after list", ids=(x,))
        if e.shape[0]:
            key = e[:, 1] * n + e[:, 0]
            uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
            if np.any(counts > 1):
                k = int(first[np.argmax(counts > 1)])
                x = ids[int(e[k, 0])]
                raise PrecedenceError(f"requests[{int(e[k, 1])}].after", f"names predecessor {x!r} twice",
                                      "list each predecessor once", ids=(x,))
        graph = nx.DiGraph()
        graph.add_nodes_from(range(n))
        graph.add_edges_from(e.tolist())
        level = np.zeros(n, dtype=np.int64)
        try:
            for depth, generation in enumerate(nx.topological_generations(graph)):
                level[generation] = depth
        except nx.NetworkXUnfeasible:
            cycle = [u for u, _ in nx.find_cycle(graph)]
            names = tuple(ids[u] for u in cycle)
            raise CycleError("after", "the precedence graph has a cycle: " + " -> ".join(names + names[:1]),
                             "remove one of these dependencies so that the requests can be ordered",
                             ids=names) from None
        e.setflags(write=False)
        level.setflags(write=False)
        return cls(int(n), e, level)

    @classmethod
    def from_after(cls, after: Sequence | Mapping, ids: Sequence[str]) -> "Precedence | None":
        """The DAG of each request's predecessor ids (see :func:`parse_after`); None if there is no edge.

        Parameters
        ----------
        after
            Predecessor ids per request, or a mapping ``id -> predecessor ids``.
        ids
            The requests' ids, one per row.
        """
        edges = parse_after(after, ids)
        return cls.from_edges(len(ids), edges, ids) if edges.shape[0] else None

    # -- structure ---------------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        """Number of dependencies (edges)."""
        return int(self.edges.shape[0])

    @property
    def depth(self) -> int:
        """Requests on the longest chain (count): the number of topological generations."""
        return int(self.level.max()) + 1 if self.n else 0

    def _csr(self, by: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour lists in compressed form (cached): ``by=0`` successors, ``by=1`` predecessors."""
        cache = self.__dict__.setdefault("_csr_cache", {})
        if by not in cache:
            key = self.edges[:, by]
            order = np.argsort(key, kind="stable")
            ptr = np.zeros(self.n + 1, dtype=np.int64)
            np.cumsum(np.bincount(key, minlength=self.n), out=ptr[1:])
            cache[by] = (ptr, self.edges[order, 1 - by])
        return cache[by]

    def successors(self) -> list[list[int]]:
        """Successor rows of each request (lists in edge order; a new list each call)."""
        ptr, idx = self._csr(0)
        idx = idx.tolist()
        return [idx[ptr[r]:ptr[r + 1]] for r in range(self.n)]

    def predecessors(self) -> list[list[int]]:
        """Predecessor rows of each request (lists in edge order; a new list each call)."""
        ptr, idx = self._csr(1)
        idx = idx.tolist()
        return [idx[ptr[r]:ptr[r + 1]] for r in range(self.n)]

    def in_degree(self) -> np.ndarray:
        """Number of predecessors of each request (int64)."""
        return np.bincount(self.edges[:, 1], minlength=self.n)

    def workflows(self) -> np.ndarray:
        """Workflow of each request: the label of its weakly connected component (int64, cached).

        Labels run ``0 .. W-1`` in the order of each workflow's first row; a request without
        predecessors or successors is a workflow of its own.
        """
        cache = self.__dict__
        if "_workflows" not in cache:
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            adj = coo_matrix((np.ones(self.n_edges), (self.edges[:, 0], self.edges[:, 1])), shape=(self.n, self.n))
            labels = connected_components(adj, directed=True, connection="weak")[1].astype(np.int64)
            labels.setflags(write=False)
            cache["_workflows"] = labels
        return cache["_workflows"]

    def graph(self, ids: Sequence[str] | None = None) -> nx.DiGraph:
        """The DAG as a new ``networkx.DiGraph``: nodes are rows (with an ``"id"`` attribute when given).

        Parameters
        ----------
        ids
            Request ids to attach to the nodes.
        """
        g = nx.DiGraph()
        if ids is None:
            g.add_nodes_from(range(self.n))
        else:
            g.add_nodes_from((r, {"id": ids[r]}) for r in range(self.n))
        g.add_edges_from(self.edges.tolist())
        return g

    def subset(self, rows: np.ndarray) -> "Precedence | None":
        """The DAG among ``rows`` renumbered ``0 .. len(rows)-1`` (edges leaving the subset dropped).

        Parameters
        ----------
        rows
            Distinct row indices to keep, in their new order.
        """
        rows = np.asarray(rows, dtype=np.int64)
        new = np.full(self.n, -1, dtype=np.int64)
        new[rows] = np.arange(rows.size)
        pred, succ, bounds = self._edges_by_level()
        keep = (new[pred] >= 0) & (new[succ] >= 0)
        if not keep.any():
            return None
        # a sub-DAG needs no new validation; its levels follow from this DAG's topological order
        level = np.zeros(self.n, dtype=np.int64)
        for lv in range(1, self.depth):
            a, b = bounds[lv], bounds[lv + 1]
            k = keep[a:b]
            if k.any():
                np.maximum.at(level, succ[a:b][k], level[pred[a:b][k]] + 1)
        e = np.column_stack([new[pred[keep]], new[succ[keep]]])
        e = e[np.lexsort((e[:, 0], e[:, 1]))]
        sub_level = level[rows]
        e.setflags(write=False)
        sub_level.setflags(write=False)
        return Precedence(int(rows.size), e, sub_level)

    # -- paths over the levels -------------------------------------------------------------------
    def _edges_by_level(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Edges sorted by their successor's level, with the slice bounds of each level."""
        cached = self.__dict__.get("_by_level")
        if cached is None:
            succ_level = self.level[self.edges[:, 1]]
            order = np.argsort(succ_level, kind="stable")
            e = self.edges[order]
            bounds = np.searchsorted(succ_level[order], np.arange(self.depth + 1))
            cached = (e[:, 0].copy(), e[:, 1].copy(), bounds)
            self.__dict__["_by_level"] = cached
        return cached

    def earliest_start(self, duration: np.ndarray, release: np.ndarray | None = None) -> np.ndarray:
        """Earliest start of each request when each takes ``duration`` and none starts before ``release``.

        ``start_r = max(release_r, max_{q -> r} (start_q + duration_q))``: the longest path that ends
        where ``r`` starts.

        Parameters
        ----------
        duration
            Time each request takes, seconds (any unit; the result is in the same).
        release
            Earliest start of each request (e.g. its arrival), seconds; default 0.

        Returns
        -------
        numpy.ndarray
            Start of each request (float64).
        """
        d = np.asarray(duration, dtype=np.float64)
        start = np.zeros(self.n) if release is None else np.array(release, dtype=np.float64)
        pred, succ, bounds = self._edges_by_level()
        for lv in range(1, self.depth):
            a, b = bounds[lv], bounds[lv + 1]
            if a < b:
                p = pred[a:b]
                np.maximum.at(start, succ[a:b], start[p] + d[p])
        return start

    def tails(self, duration: np.ndarray) -> np.ndarray:
        """Longest path after each request finishes: ``tail_r = max_{r -> s} (duration_s + tail_s)``.

        Parameters
        ----------
        duration
            Time each request takes, seconds (any unit).

        Returns
        -------
        numpy.ndarray
            Tail of each request (float64; 0 for requests without successors).
        """
        d = np.asarray(duration, dtype=np.float64)
        tail = np.zeros(self.n)
        pred, succ, bounds = self._edges_by_level()
        for lv in range(self.depth - 1, 0, -1):
            a, b = bounds[lv], bounds[lv + 1]
            if a < b:
                s = succ[a:b]
                np.maximum.at(tail, pred[a:b], d[s] + tail[s])
        return tail

    def upward_rank(self, weight: np.ndarray, handoff: np.ndarray | float = 0.0) -> np.ndarray:
        """HEFT's upward rank: ``rank_r = weight_r + max_{r -> s} (handoff_s + rank_s)``.

        The length of the longest path from ``r``'s start to the end of the workflow, with
        ``handoff_s`` the cost of passing work on to ``s`` (its prefill, in HEFT the communication
        cost). Dispatching the ready request of highest rank first is list scheduling along the
        critical path; without precedence the rank is the weight.

        Parameters
        ----------
        weight
            Estimated processing time of each request (any unit, e.g. decode steps).
        handoff
            Cost of starting each request after its predecessors, in the same unit (scalar or
            one per request).

        Returns
        -------
        numpy.ndarray
            Rank of each request (float64).
        """
        w = np.asarray(weight, dtype=np.float64)
        h = np.broadcast_to(np.asarray(handoff, dtype=np.float64), w.shape)
        return w + self.tails(w + h)

    def longest_path(self, duration: np.ndarray, release: np.ndarray | None = None) -> float:
        """Length of the longest path, ``max_r (earliest_start_r + duration_r)`` (see :meth:`critical_path`).

        Parameters
        ----------
        duration
            Time each request takes, seconds (any unit).
        release
            Earliest start of each request, seconds; default 0.
        """
        d = np.asarray(duration, dtype=np.float64)
        return float(np.max(self.earliest_start(d, release) + d)) if self.n else 0.0

    def critical_path(self, duration: np.ndarray, release: np.ndarray | None = None) -> tuple[float, list[int]]:
        """The longest path: when the last request could finish at the earliest, and the chain that forces it.

        Parameters
        ----------
        duration
            Time each request takes, seconds.
        release
            Earliest start of each request (arrival), seconds; default 0.

        Returns
        -------
        length, rows
            ``max_r (start_r + duration_r)`` in seconds, and the rows of a chain that attains it,
            first to last (it starts at a request whose start is its own release).
        """
        d = np.asarray(duration, dtype=np.float64)
        start = self.earliest_start(d, release)
        finish = start + d
        last = int(np.argmax(finish))
        ptr, idx = self._csr(1)
        path = [last]
        while ptr[path[-1]] < ptr[path[-1] + 1]:
            v = path[-1]
            cand = idx[ptr[v]:ptr[v + 1]]
            best = int(cand[np.argmax(finish[cand])])
            if finish[best] < start[v] - 1e-12 * max(1.0, abs(start[v])):
                break  # v starts at its own release, after all its predecessors finished
            path.append(best)
        return float(finish[last]), path[::-1]
