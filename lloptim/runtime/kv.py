"""KV-memory rules of the runtime, engine-neutral: what admission needs, whom to preempt, projected peaks.

The engine (:mod:`lloptim.runtime.engine`) keeps the block accounting of :mod:`lloptim.memory`
and calls these rules; other engines (the vLLM / transformers adapters) can call them on their own
state: every function takes plain numbers or arrays.

**Preemption.** In paged mode nothing is reserved ahead: before a decode step the running requests
whose tokens fill their last block need one more, and when fewer blocks are free the engine
preempts running requests until the step fits (recompute: the victim's cache is dropped; it
waits, at the head of its instance's queue, to be prefilled again with its prompt followed by the
tokens it had generated, and then decodes on from there; with ``preemption="swap"`` its cache is
copied to host memory instead and copied back when it resumes, see :mod:`lloptim.runtime.engine`).
Which request is the victim:

``"newest"`` (default; vLLM's rule)
    The running request admitted (or re-admitted) last. It has the smallest context among
    requests admitted together, so its recompute is cheap, and under FCFS it is the one that
    arrived last.
``"fewest-tokens"``
    The running request holding the fewest KV tokens: the cheapest recompute
    (``prefill_per_token_s`` x its tokens), whatever its age.
``"longest-remaining"``
    The running request with the most (estimated) output still to generate: it frees the most
    area per recompute and postpones work that finishes last anyway.

A policy may choose the victim itself (:meth:`~lloptim.runtime.policy.IterationScheduler.victim`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lloptim.errors import SpecError
from lloptim.memory import blocks

__all__ = ["VICTIM_RULES", "PREEMPTION_MODES", "check_victim_rule", "choose_victim", "held_blocks",
           "projected_peak_fits", "projected_peak_blocks", "ProjectedMemory"]

#: Victim rules for preemption (see the module docstring).
VICTIM_RULES = ("newest", "fewest-tokens", "longest-remaining")
#: :meth:`ProjectedMemory.held_at` sums the members' blocks directly, a (steps x members) matrix, up to
#: this many entries, and through threshold sums over the members sorted once (:class:`_CeilSums`)
#: above: built in ~20-50 us, then ~10-60 us per query against ~1 ms for 2,800 steps x 23 members
#: directly. The crossover measured with numpy 2 on this machine (members 8-128, steps 1-2,800):
#: the two cost the same near 1-4k entries; either returns the same integers.
HELD_DIRECT_MAX = 2048
#: What preemption does to the victim: drop its cache and prefill it again (vLLM's default), or copy
#: its cache to host memory and back (vLLM's ``swap``; recompute when the host space is full).
PREEMPTION_MODES = ("recompute", "swap")


def check_victim_rule(rule: str) -> str:
    """``rule`` if it is a victim rule, else a SpecError naming the ``victim`` option."""
    if rule not in VICTIM_RULES:
        raise SpecError("victim", f"unknown preemption victim rule {rule!r}", f"use one of {list(VICTIM_RULES)}")
    return rule


def held_blocks(tokens: int, floor_tokens: int, block_tokens: int) -> int:
    """Blocks a request holding ``tokens`` KV tokens occupies, at least its reservation ``floor_tokens``.

    Parameters
    ----------
    tokens
        KV tokens the request holds, tokens.
    floor_tokens
        Its reservation, tokens (0 in paged mode).
    block_tokens
        Tokens per KV block.

    Returns
    -------
    int
        Blocks held (count).
    """
    return blocks(max(tokens, floor_tokens), block_tokens)


def choose_victim(rule: str, clients: Sequence[int], admitted: Sequence[int], kv_tokens: Sequence[int],
                  remaining: Sequence[float]) -> int:
    """The client whose running request a preemption takes, by ``rule``.

    Parameters
    ----------
    rule
        One of :data:`VICTIM_RULES`.
    clients
        Running clients (global indices), the candidates.
    admitted
        Admission sequence number of each candidate (larger: admitted later).
    kv_tokens
        KV tokens each candidate holds, tokens.
    remaining
        Estimated output tokens each candidate still has to generate, tokens.

    Returns
    -------
    int
        The chosen client; ties go to the later admitted.
    """
    if not len(clients):
        raise ValueError("no running request to preempt")
    adm = np.asarray(admitted, dtype=np.float64)
    if rule == "newest":
        key = adm
    elif rule == "fewest-tokens":
        key = -np.asarray(kv_tokens, dtype=np.float64) * (1 << 30) + adm
    elif rule == "longest-remaining":
        key = np.asarray(remaining, dtype=np.float64) * (1 << 30) + adm
    else:
        check_victim_rule(rule)
    return int(clients[int(np.argmax(key))])


def projected_peak_blocks(tokens: np.ndarray, remaining: np.ndarray, block_tokens: int) -> int:
    """Most blocks a set of running requests will hold at once if none is preempted, count.

    Request ``j`` holds ``tokens[j]`` tokens now and grows by one per decode step for
    ``remaining[j]`` more steps, then frees everything. Its holding only grows until it finishes,
    so the total peaks at a step where some request takes its last step: the maximum over the
    completion steps ``tau`` of the blocks of the requests still running at ``tau``.

    Parameters
    ----------
    tokens
        KV tokens each request holds now (context; a request not yet prefilled counts its prompt).
    remaining
        Decode steps each request still takes (>= 1; estimated when lengths are unknown).
    block_tokens
        Tokens per KV block.

    Returns
    -------
    int
        The projected peak, blocks (0 for no request).
    """
    t = np.asarray(tokens, dtype=np.int64)
    rem = np.maximum(np.asarray(remaining, dtype=np.int64), 1)
    if t.size == 0:
        return 0
    taus = np.unique(rem)
    # at step tau, request j (rem_j >= tau) holds blocks(t_j + tau)
    alive = rem[None, :] >= taus[:, None]
    held = -(-(t[None, :] + taus[:, None]) // block_tokens)
    return int((held * alive).sum(axis=1).max())


def projected_peak_fits(tokens: np.ndarray, remaining: np.ndarray, capacity_blocks: int, block_tokens: int) -> bool:
    """Whether :func:`projected_peak_blocks` stays within ``capacity_blocks`` (MC-SF's admission test).

    Parameters
    ----------
    tokens
        KV tokens each request holds now, tokens.
    remaining
        Decode steps each request still takes (count, >= 1).
    capacity_blocks
        KV blocks of the instance (count).
    block_tokens
        Tokens per KV block.

    Returns
    -------
    bool
        Whether the projected peak, blocks, is at most ``capacity_blocks``.
    """
    return projected_peak_blocks(tokens, remaining, block_tokens) <= capacity_blocks


class ProjectedMemory:
    """The KV blocks a set of admitted requests will hold, step by step, if none is preempted.

    Request ``j`` holds ``tokens[j]`` tokens now and ``tokens[j] + tau`` after ``tau`` more decode
    steps, at least its reservation ``floors[j]`` (reserve mode), until it finishes after
    ``remaining[j]`` of them; its holding only grows, so the total peaks at completion steps.
    :meth:`fits` answers, for many candidates at once, whether adding a candidate keeps every
    future completion step within the capacity (MC-SF's admission test, Jaillet et al. 2025), in
    O(candidates x set) numpy work; :meth:`first_fit`, the first candidate in order that fits, in
    O(candidates log set) (what a memory-aware queue asks at every fill, over its whole queue).

    Parameters
    ----------
    tokens
        KV tokens each admitted request holds now (a waiting one: its context), tokens.
    remaining
        Decode steps each still takes (>= 1; from estimates when lengths are unknown).
    capacity_blocks
        Blocks of the instance (count).
    block_tokens
        Tokens per block.
    floors
        Tokens each request reserves (reserve mode); None: none (paged mode).
    """

    def __init__(self, tokens, remaining, capacity_blocks: int, block_tokens: int, floors=None) -> None:
        self.t = np.asarray(tokens, dtype=np.int64)
        self.rem = np.maximum(np.asarray(remaining, dtype=np.int64), 1)
        self.f = np.zeros_like(self.t) if floors is None else np.asarray(floors, dtype=np.int64)
        self.cap = int(capacity_blocks)
        self.B = int(block_tokens)
        self._update()

    def _update(self) -> None:
        self._sums = None  # the threshold sums of :meth:`held_at`, built when first needed
        if self.t.size:
            self.taus = np.unique(self.rem)
            self.margin = self.cap - self.held_at(self.taus)
        else:
            self.taus = np.zeros(0, dtype=np.int64)
            self.margin = np.zeros(0, dtype=np.int64)

    def _threshold_sums(self) -> tuple:
        """The set's holding as threshold sums (:class:`_CeilSums`), for :meth:`held_at` on many steps.

        Member ``j`` holds ``blocks(max(t_j + tau, f_j))`` while ``tau <= rem_j``: its floor's
        blocks while ``tau <= g_j = f_j - t_j`` (then ``t_j + tau <= f_j``), ``blocks(t_j + tau)``
        after. So the set holds the sum of ``blocks(t_j + tau)`` over the members alive at ``tau``,
        less that sum over the members still on their floor (``min(rem_j, g_j) >= tau``), plus
        their floors' blocks: three threshold sums, exact in integers. In paged mode (every
        ``g_j <= 0``) no member is on its floor at any ``tau >= 0`` (at ``tau = 0`` with ``g_j = 0``
        both give ``blocks(t_j)``), so the first sum alone.
        """
        u = self.t + (self.B - 1)  # blocks(x) = (x + B - 1) // B
        alive = _CeilSums(self.rem, u, self.B)
        g = self.f - self.t
        if g.max() <= 0:
            return alive, None, None
        on_floor = np.minimum(self.rem, g)
        return alive, _CeilSums(on_floor, u, self.B), _CeilSums(on_floor, self.f + (self.B - 1), self.B, grows=False)

    @property
    def peak(self) -> int:
        """The projected peak, blocks."""
        return int(self.cap - self.margin.min()) if self.margin.size else 0

    def held_at(self, tau: np.ndarray) -> np.ndarray:
        """Blocks the set holds ``tau`` steps from now, for each entry of ``tau`` (count).

        Above :data:`HELD_DIRECT_MAX` (steps x members) entries, O(len(tau) log(set)) numpy work
        through threshold sums over the members sorted once per change of the set
        (:meth:`_threshold_sums`) instead of the (steps x members) matrix: :meth:`first_fit` asks
        it for every queued candidate's last step (thousands, on a 5,000-request run). Both give
        the same integers (``tests/test_kv_speed.py``).

        Parameters
        ----------
        tau
            Decode steps from now (integers >= 0; 0: now).

        Returns
        -------
        numpy.ndarray
            int64 blocks, one per entry of ``tau``.
        """
        tau = np.asarray(tau, dtype=np.int64)
        if not self.t.size:
            return np.zeros(tau.shape, dtype=np.int64)
        if tau.size and tau.min() < 0:
            raise ValueError(f"held_at: tau must be >= 0 decode steps from now, got {int(tau.min())}")
        if tau.size * self.t.size <= HELD_DIRECT_MAX:
            # few entries: the direct (steps x members) sum costs less than building the threshold sums
            tokens = np.maximum(self.t[None, :] + tau[:, None], self.f[None, :])
            return (-(-tokens // self.B) * (self.rem[None, :] >= tau[:, None])).sum(axis=1)
        if self._sums is None:
            self._sums = self._threshold_sums()
        alive, grown, floor = self._sums
        held = alive(tau)
        if grown is not None:
            # the members on their floor at tau: counted at blocks(t_j + tau) above, hold blocks(f_j)
            held = held - grown(tau) + floor(tau)
        return held

    def fits(self, tokens, remaining, floors=None) -> np.ndarray:
        """Whether each candidate ``(tokens, remaining)`` could join the set without exceeding the capacity.

        A candidate fits when the set and the candidate stay within the capacity at every step
        until the candidate finishes (an overflow the set projects after that is not its doing).

        Parameters
        ----------
        tokens
            Context of each candidate (what its prefill leaves in the cache), tokens.
        remaining
            Decode steps each candidate takes (>= 1).
        floors
            Tokens each candidate reserves (reserve mode); None: none.

        Returns
        -------
        numpy.ndarray
            Boolean per candidate.
        """
        t0 = np.asarray(tokens, dtype=np.int64)
        r0 = np.maximum(np.asarray(remaining, dtype=np.int64), 1)
        f0 = np.zeros_like(t0) if floors is None else np.asarray(floors, dtype=np.int64)
        own = -(-np.maximum(t0 + r0, f0) // self.B)  # its own peak, at its last step
        ok = own + self.held_at(r0) <= self.cap
        if self.taus.size:
            need = -(-np.maximum(t0[:, None] + self.taus[None, :], f0[:, None]) // self.B)
            ok &= np.all((need <= self.margin[None, :]) | (self.taus[None, :] > r0[:, None]), axis=1)
        return ok

    def first_fit(self, tokens: np.ndarray, remaining: np.ndarray, floors=None) -> int:
        """Index of the first candidate that :meth:`fits`, or -1; vectorized.

        A candidate fits iff at every step ``tau <= remaining`` the set's blocks plus
        ``blocks(max(tokens + tau, floor))`` stay within the capacity, so it fits iff its tokens
        are at most ``min over those tau of (free blocks at tau) x block - tau`` and its floor's
        blocks at most the least free blocks over those steps: prefix minima over the set's
        completion steps and one term at its own last step.

        Parameters
        ----------
        tokens, remaining
            Candidates' contexts (tokens) and decode steps (>= 1), in order of preference.
        floors
            Tokens each candidate reserves (reserve mode); None: none.

        Returns
        -------
        int
            Position of the first candidate that fits, -1 if none does.
        """
        t0 = np.asarray(tokens, dtype=np.int64)
        r0 = np.maximum(np.asarray(remaining, dtype=np.int64), 1)
        fb = None if floors is None else -(-np.asarray(floors, dtype=np.int64) // self.B)
        rows = None  # candidates that pass the completion-step terms (None: all)
        if self.taus.size:
            # the prefix-minimum terms first, O(1) per candidate: on 5,000-request runs they rule out
            # 70-85 % of the queue, and only the rest need the set's holding at their last step
            i = np.searchsorted(self.taus, r0, side="right") - 1
            has = i >= 0
            j = np.maximum(i, 0)
            ok = ~has | (t0 <= np.minimum.accumulate(self.margin * self.B - self.taus)[j])
            if fb is not None:
                ok &= ~has | (fb <= np.minimum.accumulate(self.margin)[j])
            rows = np.flatnonzero(ok)
            t0, r0 = t0[rows], r0[rows]
            fb = None if fb is None else fb[rows]
        # the term at its own last step
        free_end = self.cap - self.held_at(r0)
        ok = t0 <= free_end * self.B - r0
        if fb is not None:
            ok &= fb <= free_end
        ok = np.flatnonzero(ok)
        if not ok.size:
            return -1
        return int(ok[0]) if rows is None else int(rows[ok[0]])

    def earliest_start(self, tokens: int, remaining: int, floor: int = 0) -> int:
        """Steps from now after which a candidate fits: 0, or the first completion step of the set that makes room.

        A candidate started ``d`` steps from now holds ``blocks(max(tokens + tau - d, floor))`` at
        step ``tau`` in ``(d, d + remaining]``; it fits when that plus the set stays within the
        capacity at the set's completion steps in its window and at its own last step (as
        :meth:`fits`, shifted). Fitting becomes possible as members finish, so ``d`` is tried at 0
        and at each completion step, in one vectorized pass.

        Parameters
        ----------
        tokens, remaining, floor
            The candidate's context (tokens), decode steps (>= 1) and reservation (tokens; 0 in
            paged mode).

        Returns
        -------
        int
            The offset, decode steps (the set's last completion step if nothing earlier works).
        """
        if not self.t.size:
            return 0
        r0 = max(int(remaining), 1)
        d = np.concatenate([[0], self.taus])
        own = -(-max(int(tokens) + r0, int(floor)) // self.B)
        ok = own + self.held_at(d + r0) <= self.cap
        tau = self.taus[None, :]
        alive = (tau > d[:, None]) & (tau <= d[:, None] + r0)
        need = -(-np.maximum(int(tokens) + tau - d[:, None], int(floor)) // self.B)
        ok &= np.all(~alive | (need <= self.margin[None, :]), axis=1)
        first = np.flatnonzero(ok)
        return int(d[first[0]]) if first.size else int(self.taus[-1])

    def blocked_for(self, tokens: int, remaining: int, floor: int = 0) -> int:
        """Steps from now before which a candidate cannot fit (a lower bound on :meth:`earliest_start`), >= 1.

        Started ``d`` steps from now, a candidate holds ``max(tokens + tau - d, floor)`` tokens at
        step ``tau`` in ``(d, d + remaining]``. At each of the set's completion steps ``tau_i``,
        with ``m_i`` blocks free, that fits iff ``tokens + tau_i - d <= m_i B`` (and the floor
        does): so ``d`` in ``[tau_i - remaining, min(tau_i, tau_i + tokens - m_i B))`` is ruled out.
        Likewise its first step, ``d + 1``: between two completion steps the set's holding only grows,
        so where it leaves no room for ``blocks(tokens + 1)`` right after a completion, no ``d`` up to
        the next completion works. The first ``d >= 1`` outside every such interval is returned; the
        candidate's own last step is not checked, so it may still not fit then. With the smallest context and fewest steps
        of a queue, no request of the queue fits before it.

        Parameters
        ----------
        tokens, remaining, floor
            The candidate's context (tokens), decode steps (>= 1) and reservation (tokens; 0 in
            paged mode).

        Returns
        -------
        int
            The offset, decode steps (>= 1).
        """
        d = 1
        if not self.t.size:
            return d
        room = self.margin * self.B
        lo = self.taus - max(int(remaining), 1)
        hi = np.where(int(floor) > room, self.taus, np.minimum(self.taus, self.taus + int(tokens) - room))
        # its first step: between two completion steps the set only grows, so if the cache is too
        # full for the candidate's first step right after a completion, it is until the next one
        start = np.concatenate([[0], self.taus[:-1]])
        first = -(-max(int(tokens) + 1, int(floor)) // self.B)
        full = self.held_at(start + 1) + first > self.cap
        lo = np.concatenate([lo, start[full]])
        hi = np.concatenate([hi, self.taus[full]])
        keep = hi > lo
        for a, b in sorted(zip(lo[keep].tolist(), hi[keep].tolist())):
            if a > d:
                break  # sorted by start: d is outside every interval that starts later
            d = max(d, b)
        return d

    def add(self, tokens: int, remaining: int, floor: int = 0) -> None:
        """Add one admitted request to the set.

        Parameters
        ----------
        tokens
            KV tokens it holds now, tokens.
        remaining
            Decode steps it still takes (count; at least 1 is counted).
        floor
            Its reservation, tokens (0 in paged mode).
        """
        self.t = np.append(self.t, np.int64(tokens))
        self.rem = np.append(self.rem, np.int64(max(int(remaining), 1)))
        self.f = np.append(self.f, np.int64(floor))
        self._update()


class _CeilSums:
    """Sums ``S(tau) = sum over {j : h_j >= tau} of (u_j + tau) // B`` for many integer ``tau`` at once.

    With ``q_j, r_j = divmod(u_j, B)`` and ``a, b = divmod(tau, B)`` (floor division, exact for any
    integers), ``(u_j + tau) // B = q_j + a + [r_j + b >= B]``. Sorted by ``h`` descending, the
    members with ``h_j >= tau`` are the first ``k``: ``S = Q[k] + k a + (number of those first k
    with r_j >= B - b)``, read from prefix sums ``Q`` and a (members + 1) x (distinct residues + 1)
    table of counts. So each ``tau`` costs O(log members), against O(members) for the direct sum
    (the same integers).

    Parameters
    ----------
    h
        Threshold of each member: it counts at ``tau`` iff ``h_j >= tau`` (decode steps).
    u
        Numerator of each member (tokens; ``tokens + B - 1`` for ``blocks(tokens + tau)``).
    B
        Tokens per block (> 0).
    grows
        False: count ``u_j // B`` alone (a constant per member, e.g. a reservation's blocks), no
        ``tau`` term.
    """

    def __init__(self, h: np.ndarray, u: np.ndarray, B: int, grows: bool = True) -> None:
        order = np.argsort(-h, kind="stable")
        self.neg_h = -h[order]  # ascending: the first k members are those with -h_j <= -tau
        q, r = np.divmod(u[order], B)
        self.B = B
        self.grows = grows
        self.q = np.concatenate([[0], np.cumsum(q)])
        if grows:
            self.res = np.unique(r)
            self.count = np.zeros((r.size + 1, self.res.size + 1), dtype=np.int64)
            self.count[1:, :-1] = np.cumsum(r[:, None] >= self.res[None, :], axis=0)

    def __call__(self, tau: np.ndarray) -> np.ndarray:
        """``S(tau)`` for each entry of ``tau`` (int64 array of the same shape)."""
        k = np.searchsorted(self.neg_h, -tau, side="right")
        if not self.grows:
            return self.q[k]
        a, b = np.divmod(tau, self.B)
        # r_j + b >= B <=> r_j >= B - b <=> r_j >= res[i], i the first distinct residue >= B - b
        i = np.searchsorted(self.res, self.B - b, side="left")
        return self.q[k] + k * a + self.count[k, i]
