"""LPT list scheduling + vectorized local search: the incumbent of every solve, and a backend.

* :func:`lpt`: longest processing time first, each request to the client where it would finish
  earliest (Graham's 4/3 - 1/(3C) guarantee on identical clients).
* :func:`local_search`: repeatedly take the most loaded client and apply the best **move** (one of
  its requests to another client) or **swap** (one of its requests with a smaller one elsewhere)
  that lowers its load without creating a load as high; every candidate pair is scored with numpy
  (``|J| x C`` moves, ``|J| x R`` swaps, ``J`` = the requests on the max client), in blocks of
  rows of at most :data:`PAIR_BLOCK` pairs, so the memory stays bounded (tens of MiB) however many
  requests the max client holds. Stops at a local optimum, at the closed-form bound, after
  ``max_iter`` improvements, or when its work budget (``work_limit``) is spent.

**A deterministic budget.** The search counts its work in *elements touched*: every candidate
pair scored, plus ``R + C`` per step for finding the max client and its requests. A budget in
that unit stops the search at the same step on an idle or a loaded machine, so the online plans
that use it (:mod:`lloptim.runtime.rolling`, :mod:`lloptim.runtime.endgame`) give the same
schedule whatever else the machine runs. ``time_limit_s`` stays as a wall-clock safety net (and
as the limit of an offline :func:`lloptim.solve` a user times).
"""

from __future__ import annotations

import heapq
import time

import numpy as np

from lloptim.formulations.binpacking import BinPackingData, binpacking_lower_bound, loads
from lloptim.solvers.registry import Backend, Capabilities, Outcome, register_backend
from lloptim.solvers.result import Limit, Termination

__all__ = ["lpt", "local_search", "GreedyBackend", "WorkBudget"]


class WorkBudget:
    """What a local search may still spend: elements touched (deterministic) and a wall-clock deadline.

    Parameters
    ----------
    work_limit
        Elements the search may touch (count: candidate pairs scored plus ``R + C`` per step);
        None: no work limit.
    deadline
        ``time.perf_counter()`` value after which the search stops (a safety net); None: none.

    Attributes
    ----------
    spent
        Elements touched so far (count).
    """

    def __init__(self, work_limit: int | None = None, deadline: float | None = None) -> None:
        self.work_limit = work_limit
        self.deadline = deadline
        self.spent = 0

    def charge(self, n: int) -> None:
        """Count ``n`` more elements touched.

        Parameters
        ----------
        n
            Elements touched (count).
        """
        self.spent += int(n)

    def exhausted(self) -> bool:
        """Whether the work budget is spent or the deadline has passed."""
        if self.work_limit is not None and self.spent >= self.work_limit:
            return True
        return self.deadline is not None and time.perf_counter() > self.deadline


def lpt(data: BinPackingData, order_key: np.ndarray | None = None, client_scale: np.ndarray | None = None,
        release: np.ndarray | None = None) -> np.ndarray:
    """LPT assignment (global client per request, int64).

    Parameters
    ----------
    data
        The instance.
    order_key
        Requests are placed in decreasing order of this key (default: their cheapest weight).
    client_scale
        Optional per-client factor on the finish time compared (``scale_c * (load_c + w)``), used by
        the Lagrangian repair to steer work away from expensive clients; default all ones.
    release
        Optional ``(C,)`` load each client already carries before these requests (work committed
        earlier, e.g. the rest of a running request), seconds; default zeros.
    """
    R, C = data.n_requests, data.n_clients
    key = data.w if order_key is None else order_key
    order = np.argsort(-key, kind="stable")
    a = np.empty(R, dtype=np.int64)
    start = np.zeros(C) if release is None else np.asarray(release, dtype=np.float64)
    if data.uniform and client_scale is None:
        w = data.w.tolist()
        heap = [(float(start[c]), c) for c in range(C)]  # (load, client): the least loaded client is on top
        heapq.heapify(heap)
        for r in order.tolist():
            load, c = heap[0]
            a[r] = c
            heapq.heapreplace(heap, (load + w[r], c))
        return a
    Wc = data.weight_matrix()
    scale = np.ones(C) if client_scale is None else np.asarray(client_scale, dtype=np.float64)
    L = start.copy()
    for r in order:
        c = int(np.argmin(scale * (L + Wc[r])))
        a[r] = c
        L[c] += Wc[r, c]
    return a


SWAP_PARTNERS = 8  # least loaded clients whose requests are scored first for swaps
MAX_SWAP_PAIRS = 4_000_000  # above this many (request, request) pairs, score only the widened set
WIDE_SWAP_PARTNERS = 64  # least loaded clients scored when scoring every request is too costly
#: Most (request, request) pairs scored in one numpy block (8 MiB per float64 array of scores). A
#: max client holding half of 100k requests would otherwise build 2.5e9-pair arrays (tens of GiB).
PAIR_BLOCK = 1 << 20


def _first_min(score, n_rows: int, n_cols: int, budget: WorkBudget | None = None) -> tuple[float, int]:
    """The first minimum, in row-major order, of the ``n_rows x n_cols`` matrix ``score`` yields by rows.

    Parameters
    ----------
    score
        ``score(rows)`` returns the float matrix's rows ``rows`` (a slice), ``(len, n_cols)``.
    n_rows, n_cols
        Shape of the matrix (counts).
    budget
        Charged with every block scored; once it is exhausted no further block is scored (the
        minimum of the blocks scored so far is returned: still a valid pair, possibly not the
        best); ``None``: no limit.

    Returns
    -------
    tuple
        ``(value, flat index)``; ``(inf, -1)`` for an empty matrix. The same as ``np.argmin`` on the
        whole matrix (ties to the first), with at most :data:`PAIR_BLOCK` entries built at once.
    """
    step = max(1, PAIR_BLOCK // max(n_cols, 1))
    best, where = np.inf, -1
    for i in range(0, n_rows, step):
        block = score(slice(i, i + step))
        f = int(np.argmin(block))
        if block.flat[f] < best:
            best, where = block.flat[f], i * n_cols + f
        if budget is not None:
            budget.charge(block.size)
            if budget.exhausted():
                break  # one scan of |J| x R pairs can take seconds on large fleets: stop on budget
    return best, where


def _move_swap(data: BinPackingData, assignment: np.ndarray, max_iter: int, budget: WorkBudget,
               goal: float, release: np.ndarray | None = None) -> np.ndarray:
    """Best move / swap off the most loaded client until none improves (see the module docstring).

    ``release`` is the load each client carries before these requests (seconds; default zeros).
    """

    a = np.array(assignment, dtype=np.int64)
    R, C = data.n_requests, data.n_clients
    uniform = data.uniform
    Wc = None if uniform else data.weight_matrix()
    w = data.w
    wr = w.copy() if uniform else Wc[np.arange(R), a]  # weight of each request on its current client
    L = np.bincount(a, weights=wr, minlength=C)
    if release is not None:
        L = L + release
    eps = 1e-12 * max(1.0, float(L.max()))
    for it in range(max_iter):
        cm = int(np.argmax(L))
        Lm = L[cm]
        if Lm <= goal * (1 + 1e-12) or budget.exhausted():
            break
        budget.charge(R + C)  # the max client and its requests
        J = np.flatnonzero(a == cm)
        if uniform:
            # moves: the best target of a move is the least loaded other client
            Lo = L.copy()
            Lo[cm] = np.inf
            c2 = int(np.argmin(Lo))
            mv = np.maximum(Lm - w[J], L[c2] + w[J])
            budget.charge(J.size)
            jm = int(np.argmin(mv))
            best, kind, arg = mv[jm], 0, (J[jm], c2)
            # swaps: j on cm with k elsewhere, delta = w_j - w_k > 0. The least loaded clients
            # have the most room, so score their requests first and all others only if that fails
            low = np.argpartition(Lo, SWAP_PARTNERS)[:SWAP_PARTNERS] if C > SWAP_PARTNERS + 1 else None
            first = ()
            if low is not None:
                is_low = np.zeros(C, dtype=bool)
                is_low[low] = True
                first = (np.flatnonzero(is_low[a]),)
            for others in first + (None,):
                if others is None:
                    if J.size * R > MAX_SWAP_PAIRS:
                        # scoring every request is |J| x R work per step: at 100k requests it is
                        # what makes the search take minutes, so widen the partner set instead
                        wide = np.argpartition(Lo, min(WIDE_SWAP_PARTNERS, C - 2))[:WIDE_SWAP_PARTNERS]
                        is_wide = np.zeros(C, dtype=bool)
                        is_wide[wide] = True
                        is_wide[cm] = False
                        others = np.flatnonzero(is_wide[a])
                    else:
                        others = np.flatnonzero(a != cm)
                if not others.size:
                    continue
                wJ, wk, Lk = w[J], w[others], L[a[others]]

                def swap_loads(rows, wJ=wJ, wk=wk, Lk=Lk):
                    d = wJ[rows, None] - wk[None, :]
                    val = np.maximum(Lm - d, Lk[None, :] + d)
                    val[d <= 0] = np.inf
                    return val

                low_val, flat = _first_min(swap_loads, J.size, others.size, budget)
                if low_val < best:
                    jj, kk = divmod(flat, others.size)
                    best, kind, arg = low_val, 1, (J[jj], others[kk])
                if best < Lm - eps:
                    break
        else:
            mvm = L[None, :] + Wc[J]               # new load of the target client
            mvm = np.maximum(mvm, (Lm - wr[J])[:, None])
            mvm[:, cm] = np.inf
            budget.charge(mvm.size)
            flat = int(np.argmin(mvm))
            jj, c2 = divmod(flat, C)
            best, kind, arg = mvm.flat[flat], 0, (J[jj], c2)
            others = np.flatnonzero(a != cm)
            if others.size:
                ck = a[others]
                left_cm, into_cm, left_ck = Lm - wr[J], Wc[others, cm], L[ck] - wr[others]

                def swap_loads(rows):
                    new_cm = left_cm[rows, None] + into_cm[None, :]
                    new_ck = left_ck[None, :] + Wc[J[rows, None], ck[None, :]]
                    return np.maximum(new_cm, new_ck)

                low_val, flat = _first_min(swap_loads, J.size, others.size, budget)
                if low_val < best:
                    jj, kk = divmod(flat, others.size)
                    best, kind, arg = low_val, 1, (J[jj], others[kk])
        if not best < Lm - eps:
            break
        if kind == 0:
            j, c2 = int(arg[0]), int(arg[1])
            nw = w[j] if uniform else Wc[j, c2]
            L[cm] -= wr[j]
            L[c2] += nw
            a[j], wr[j] = c2, nw
        else:
            j, k = int(arg[0]), int(arg[1])
            ck = int(a[k])
            nj = w[j] if uniform else Wc[j, ck]
            nk = w[k] if uniform else Wc[k, cm]
            L[cm] += nk - wr[j]
            L[ck] += nj - wr[k]
            a[j], a[k], wr[j], wr[k] = ck, cm, nj, nk
    return a


MAX_PAIR_JOBS = 16      # two clients holding more requests than this are not re-split exactly
PAIR_PARTNERS = 8       # least loaded clients tried against the max client per step
_BITS: dict[int, np.ndarray] = {}


def _subset_bits(n: int) -> np.ndarray:
    """The ``(2**n, n)`` 0/1 matrix of all subsets of ``n`` items (cached)."""
    if n not in _BITS:
        _BITS[n] = ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float64)
    return _BITS[n]


def _rebalance_pair(data: BinPackingData, a: np.ndarray, L: np.ndarray) -> bool:
    """Re-split the requests of the max client and a lightly loaded one optimally; in place.

    For the :data:`PAIR_PARTNERS` least loaded clients, enumerates every split of the two clients'
    requests (at most :data:`MAX_PAIR_JOBS` together, ``2**n`` subset sums in one matrix product) and
    applies the first that lowers the max client's load. Identical clients only. Returns whether
    it improved.
    """
    w = data.w
    cm = int(np.argmax(L))
    Lm = L[cm]
    on_max = np.flatnonzero(a == cm)
    for c2 in np.argsort(L)[:PAIR_PARTNERS + 1].tolist():
        if c2 == cm or L[c2] >= Lm:
            continue
        U = np.r_[on_max, np.flatnonzero(a == c2)]
        if U.size > MAX_PAIR_JOBS:
            continue
        sums = _subset_bits(U.size) @ w[U]
        total = Lm + L[c2]
        worst = np.maximum(sums, total - sums)
        b = int(np.argmin(worst))
        if worst[b] < Lm - 1e-12 * max(1.0, Lm):
            mask = _subset_bits(U.size)[b].astype(bool)
            a[U[mask]] = cm
            a[U[~mask]] = c2
            L[cm], L[c2] = sums[b], total - sums[b]
            return True
    return False


def local_search(data: BinPackingData, assignment: np.ndarray, max_iter: int = 100_000,
                 time_limit_s: float | None = None, target: float | None = None,
                 release: np.ndarray | None = None, work_limit: int | None = None) -> np.ndarray:
    """Improve ``assignment`` off the most loaded client; returns a new array.

    Best moves and swaps until none improves; then (identical clients) an optimal re-split of the
    max client's and a lightly loaded client's requests (:func:`_rebalance_pair`), and again, until
    that fails too (at most ``C // 4`` re-splits: beyond that the gain is within round-off of the
    weights' granularity and only costs time).

    Parameters
    ----------
    data
        The instance.
    assignment
        Starting assignment (not modified).
    max_iter
        Most improving steps of each kind.
    time_limit_s
        Wall-clock limit, seconds (None: none). Where the answer must not depend on the machine's
        load (the online plans), give ``work_limit`` and keep this only as a safety net far above
        what the work takes.
    target
        Stop once the makespan is at or below this, seconds (default: the closed-form lower bound).
    release
        Optional ``(C,)`` load each client carries before these requests, seconds: the makespan is
        then ``max_c release_c + load_c`` (the rolling plans of :mod:`lloptim.runtime.rolling`).
        Only moves and swaps run then.
    work_limit
        Work budget, elements touched (count: every candidate pair scored plus ``R + C`` per step;
        see :class:`WorkBudget`); the search stops at the first check past it, the same on any
        machine. None: no work limit.
    """
    a = np.array(assignment, dtype=np.int64)
    if data.n_clients == 1 or a.size == 0:
        return a
    if work_limit is not None and (isinstance(work_limit, bool) or not isinstance(work_limit, (int, np.integer))
                                   or work_limit < 0):
        from lloptim.errors import SpecError

        raise SpecError("local_search.work_limit", f"must be a non-negative integer, got {work_limit!r}",
                        "give a count of elements touched (e.g. 50_000_000), or None for no work limit")
    if release is not None:
        release = np.asarray(release, dtype=np.float64)
        if target is None:
            # average (over the cheapest weights), largest release, largest job: each is <= the optimum
            w = data.w
            target = max(float((w.sum() + release.sum()) / data.n_clients), float(release.max()),
                         float(release.min() + w.max()))
    goal = binpacking_lower_bound(data) if target is None else target
    budget = WorkBudget(work_limit, None if time_limit_s is None else time.perf_counter() + time_limit_s)
    a = _move_swap(data, a, max_iter, budget, goal, release)
    if not data.uniform or release is not None:
        return a
    L = np.bincount(a, weights=data.w, minlength=data.n_clients)
    # each re-split gains little once loads sit within one request's granularity: a few per client
    for _ in range(min(max_iter, max(1, data.n_clients // 4))):
        if L.max() <= goal * (1 + 1e-12) or budget.exhausted():
            break
        budget.charge(data.n_requests + data.n_clients)
        if not _rebalance_pair(data, a, L):
            break
        a = _move_swap(data, a, max_iter, budget, goal)
        L = np.bincount(a, weights=data.w, minlength=data.n_clients)
    return a


class GreedyBackend(Backend):
    """LPT + local search; no proof beyond the formulation's bound. Milliseconds at 1319 x 200."""

    name = "greedy"
    description = "LPT list scheduling + vectorized move/swap local search (numpy)"
    capabilities = Capabilities(supports_time_limit=True)

    def solve_task(self, task):
        """The pipeline's start (LPT + local search), polished again when a warm start won.

        Parameters
        ----------
        task : FormulationTask
            A bin-packing task; ``task.incumbent`` is the start's assignment.

        Returns
        -------
        Outcome
            The assignment and its makespan, seconds (no bound of its own).
        """
        if task.formulation != "binpacking":
            return super().solve_task(task)
        # the pipeline's incumbent is already LPT + local search (or a better warm start); polish it
        # further only when a warm start won, since local search is deterministic
        a = task.incumbent
        if task.params.warm_start is not None:
            a = local_search(task.data, a, time_limit_s=task.params.time_limit_s)
        obj = float(loads(task.data, a).max())
        return Outcome(assignment=a, objective=obj, bound=None, termination=Termination.FEASIBLE, limit=Limit.NONE)


register_backend(GreedyBackend())
