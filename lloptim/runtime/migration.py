"""Live migration of running requests between instances, at the cost the hardware profile states.

The request schedulers move only requests that have not started: a started request's KV cache
lives on its instance. Migration is the opt-in exception. In the end game (no request left to
hand out) an instance with an idle client may take over a *running* request of another instance:
its KV cache is copied over the interconnect, which stalls the destination instance for
``LatencyModel.transfer_time(kv_tokens)`` seconds (``kv_transfer_base_s + kv_transfer_per_token_s
x kv_tokens``), and the request decodes on from where it was.

Because every decode step advances each request by one token wherever it runs, moving a request
does not shorten its own remaining steps; it pays off when the destination's steps are cheaper
(a faster instance, or a smaller batch: ``decode_per_seq_s`` and ``decode_per_kv_token_s`` are
per request) so that the instance expected to finish last finishes earlier. The rule compares
expected finish times, with the per-request terms of the latency model summed in closed form
over the remaining steps:

``finish(now, rem, kv) = now + decode_base_s * max(rem) + decode_per_seq_s * sum(rem)
+ decode_per_kv_token_s * sum(rem * kv + rem * (rem - 1) / 2)``

and moves the longest remaining request of the instance expected to finish last when that lowers
the later of the two instances' finishes by more than ``min_gain_s``. With known output lengths the
forecast is exact in the end game (only decodes remain), so every move lowers the makespan; with
estimates it is as good as they are.
"""

from __future__ import annotations

import numpy as np

from lloptim.errors import SpecError
from lloptim.hardware import transfer_time_between
from lloptim.runtime.engine import RUNNING

__all__ = ["EndGameMigration", "expected_finish_s", "with_migration"]


def expected_finish_s(now: float, latency, remaining: np.ndarray, kv_tokens: np.ndarray) -> float:
    """When an instance running only these requests finishes them, seconds (closed form).

    Parameters
    ----------
    now
        The instance clock, seconds.
    latency
        The instance's :class:`~lloptim.hardware.LatencyModel`.
    remaining
        Remaining decode steps of each running request, steps.
    kv_tokens
        Tokens in each request's KV cache now, tokens.

    Returns
    -------
    float
        ``now`` plus the time of the decode steps that finish them all, seconds.
    """
    if remaining.size == 0:
        return now
    rem = remaining
    return (now + latency.decode_base_s * float(rem.max()) + latency.decode_per_seq_s * float(rem.sum())
            + latency.decode_per_kv_token_s * float(np.sum(rem * kv_tokens + rem * (rem - 1) / 2)))


class EndGameMigration:
    """Move running requests to instances with idle clients when that ends the run earlier.

    Parameters
    ----------
    min_gain_s
        Least reduction of the expected finish of the later of the two instances for a move,
        seconds (guards against moves whose gain is within the forecast error).
    survival
        ``survival[x] = P(output > x)`` learned from training outputs (see
        :func:`~lloptim.runtime.lagrangian.survival_function`): with unknown lengths, a request
        running past its estimate is expected to need its mean residual length ``E[o - g | o > g]``
        more steps. Without it, such a request is expected to end at the next step.
    """

    def __init__(self, min_gain_s: float = 0.0, survival: np.ndarray | None = None) -> None:
        if not min_gain_s >= 0:
            raise SpecError("migration.min_gain_s", f"must be >= 0 seconds, got {min_gain_s!r}", "e.g. 0.0")
        self.min_gain_s = float(min_gain_s)
        self.survival = survival
        self.moves = 0

    def setup(self, ctx) -> None:
        """Check that the problem's profiles state a transfer cost; keep the estimates.

        Parameters
        ----------
        ctx
            The :class:`~lloptim.runtime.policy.RunContext` of the run.

        Raises
        ------
        SpecError
            More than one instance, and none whose profile states a KV-transfer cost.
        """
        instances = ctx.problem.instances
        self.can = [inst.profile.latency.can_transfer for inst in instances]
        if len(instances) > 1 and not any(self.can):
            raise SpecError("latency.kv_transfer_base_s",
                            "migration needs a KV-transfer cost, and no instance's profile states one",
                            "add kv_transfer_base_s and kv_transfer_per_token_s to the profiles' [latency] "
                            "tables, or run without migration")
        self.estimates = ctx.estimates.tolist()
        self.known = ctx.known_lengths
        self.residual = None
        if self.survival is not None and not self.known:
            s = np.asarray(self.survival, dtype=np.float64)
            # mean residual life E[o - g | o > g] = sum_{x >= g} S(x) / S(g)
            tail = np.cumsum(s[::-1])[::-1]
            self.residual = np.where(s > 0, tail / np.maximum(s, 1e-300), 1.0)
        self.moves = 0

    def _remaining(self, engine, state) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Running clients of ``state`` with their expected remaining steps and KV tokens."""
        clients, rem, kv = [], [], []
        step = state.decode_steps
        for c in state.clients:
            if engine.client_state[c] != RUNNING:
                continue
            r = engine.client_request[c]
            g = step - engine.client_start_step[c]
            left = self.estimates[r] - g
            if left < 1:
                if self.residual is not None:
                    left = float(self.residual[min(g, self.residual.size - 1)])
                left = max(left, 1.0)
            clients.append(c)
            rem.append(left)
            kv.append(engine.prompt[r] + g)
        return np.asarray(clients, dtype=np.int64), np.asarray(rem), np.asarray(kv, dtype=np.float64)

    def propose(self, engine, destination) -> tuple[int, int] | None:
        """One move into ``destination``, or None.

        Parameters
        ----------
        engine
            The :class:`~lloptim.runtime.engine.Engine` (its per-client state is read, not changed).
        destination
            The :class:`~lloptim.runtime.engine.InstanceState` that has an idle client.

        Returns
        -------
        tuple of int or None
            ``(source client, destination client)`` (global indices), or None when no move ends
            the run earlier by more than ``min_gain_s``.
        """
        # an instance with a waiting client will prefill before it decodes again; the closed-form
        # forecast covers decode-only end games, so wait until those prefills are done
        if not destination.idle or destination.waiting or not self.can[destination.index]:
            return None
        lat_b = destination.latency
        _, b_rem, b_kv = self._remaining(engine, destination)
        finish_b = expected_finish_s(destination.now, lat_b, b_rem, b_kv)
        worst, worst_finish, worst_parts = None, finish_b, None
        for src in engine.states:
            if src is destination or not src.n_running or src.waiting or not self.can[src.index] or src.alive == 0:
                continue
            parts = self._remaining(engine, src)
            f = expected_finish_s(src.now, src.latency, parts[1], parts[2])
            if f > worst_finish:
                worst, worst_finish, worst_parts = src, f, parts
        if worst is None:
            return None
        a_clients, a_rem, a_kv = worst_parts
        i = int(np.argmax(a_rem))
        c1 = int(a_clients[i])
        r = engine.client_request[c1]
        g = worst.decode_steps - engine.client_start_step[c1]
        room = destination.kv_free_blocks - destination.growth_blocks()
        if destination.held_blocks(r, engine.prompt[r] + g + 1) > room:
            return None
        keep = np.arange(a_rem.size) != i
        after_a = expected_finish_s(worst.now, worst.latency, a_rem[keep], a_kv[keep])
        start = max(destination.now, worst.now)
        transfer = transfer_time_between(worst.latency, lat_b, float(a_kv[i]))
        after_b = expected_finish_s(start + transfer, lat_b, np.append(b_rem, a_rem[i]), np.append(b_kv, a_kv[i]))
        if max(after_a, after_b) >= worst_finish - self.min_gain_s:
            return None
        self.moves += 1
        return c1, next(iter(destination.idle))


def with_migration(policy, min_gain_s: float = 0.0, survival: np.ndarray | None = None):
    """``policy`` (a :class:`~lloptim.runtime.policy.Policy` or a registered name) with end-game migration.

    Parameters
    ----------
    policy
        The policy, or its name in the registry.
    min_gain_s, survival
        Options of :class:`EndGameMigration` (seconds; training survival function).

    Returns
    -------
    Policy
        The same policy object with :attr:`~lloptim.runtime.policy.Policy.migration` set; its name
        gains a ``+migrate`` suffix.
    """
    if isinstance(policy, str):
        from lloptim.runtime.registry import make_policy

        policy = make_policy(policy)
    policy.migration = EndGameMigration(min_gain_s, survival)
    if not policy.name.endswith("+migrate"):
        policy.name += "+migrate"
    return policy
