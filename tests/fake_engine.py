"""A pure-Python serving engine for testing the engine adapters' shared layer without vLLM.

It keeps what a paged engine keeps (requests waiting and running, computed tokens, KV blocks) and
executes steps the way vLLM v1 does: running requests first (a decode token each, or the next chunk
of a prompt), then waiting requests in queue order, under a token budget, allocating KV blocks as
tokens are computed; it prices each step with a latency model, so an :class:`EngineRun` driven over
it must reproduce the simulator. Steered by a plan (as ``LloptimScheduler`` steers vLLM), it shows
its scheduling loop only the requests the plan admits.
"""

from __future__ import annotations

from lloptim.engines.common import EngineRun, KVLayout


class FakeRequest:
    def __init__(self, row: int, prompt: int, max_tokens: int) -> None:
        self.row = row
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.computed = 0  # KV tokens computed
        self.output: list[int] = []
        self.blocks = 0

    @property
    def total(self) -> int:
        """Tokens computed when the next token is sampled: the prompt and every output fed back."""
        return self.prompt + len(self.output)

    @property
    def decoding(self) -> bool:
        """Past its prompt, one sampled token away from the next sample."""
        return bool(self.output) and self.total - self.computed == 1


class FakeEngine:
    """One engine instance; ``latency`` prices steps, ``blocks`` x ``block_size`` is the KV pool.

    ``max_chunk`` caps prompt tokens per request and step (to force plan deviations); ``stall``
    makes every step process nothing (to test the stuck-engine guard).
    """

    name = "fake"

    def __init__(self, latency, clients: int, blocks: int, block_size: int = 16, budget: int = 4096,
                 max_chunk: int | None = None, stall: bool = False, preempt: bool = False) -> None:
        self.latency = latency
        self.clients = clients
        self.blocks = blocks
        self.block_size = block_size
        self.budget = budget
        self.max_chunk = max_chunk
        self.stall = stall
        self.preempts = preempt
        # attention as one dense matrix over the batch, as transformers' sdpa path (priced if set)
        self.dense_attention = getattr(latency, "dense_attention_per_pair_s", 0.0) > 0
        self.run: EngineRun | None = None
        self.k = 0
        self.waiting: list[FakeRequest] = []
        self.running: list[FakeRequest] = []
        self.free = blocks
        self.max_used = 0
        self.steps = 0

    # -- the adapter protocol --------------------------------------------------------------------
    @property
    def kv_layout(self) -> KVLayout:
        return KVLayout(self.blocks, self.block_size)

    @property
    def token_budget(self) -> int:
        return self.budget

    def attach(self, run: EngineRun, k: int) -> None:
        assert not self.waiting and not self.running, "engine not empty"
        self.run, self.k = run, k

    def detach(self) -> None:
        self.run = None
        for r in self.running + self.waiting:
            self.free += r.blocks
        self.waiting, self.running = [], []

    def submit(self, rows) -> None:
        run = self.run
        for r in rows:
            self.waiting.append(FakeRequest(r, int(run.prompt[r]), int(run.tokens_wanted[r])))

    def step(self) -> None:
        run = self.run
        plan = run.plan(self.k)
        if plan is None:
            shown_running, shown_waiting = list(self.running), list(self.waiting)
            budget = self.budget
        else:
            shown_running = [r for r in self.running if (plan.decode if r.decoding else r.row in plan.prompts)]
            order = list(plan.prompts)
            shown_running.sort(key=lambda r: order.index(r.row) if r.row in plan.prompts else -1)
            shown_waiting = sorted((r for r in self.waiting if r.row in plan.prompts), key=lambda r: order.index(r.row))
            last = {row: len(plan.victims) - i for i, row in enumerate(plan.victims)}
            shown_running.sort(key=lambda r: last.get(r.row, 0))  # the policy's victims at the tail
            n_dec = sum(1 for r in shown_running if r.row not in plan.prompts)
            budget = min(self.budget, n_dec + plan.tokens)
        work, preempted, decodes = {}, [], []
        if not self.stall:
            for r in shown_running:
                if budget <= 0:
                    break
                if r not in self.running:  # evicted earlier in this step
                    continue
                need = r.total - r.computed
                n = 1 if r.decoding else min(need, budget, self.max_chunk or need)
                while not self._alloc(r, n):
                    if not self.preempts:
                        raise AssertionError(f"out of KV blocks for request {r.row}: admission failed")
                    victim = [x for x in shown_running if x in self.running][-1]  # vLLM: the tail
                    self._evict(victim)
                    preempted.append(victim.row)
                    work.pop(victim.row, None)
                    if victim in decodes:
                        decodes.remove(victim)
                    if victim is r:
                        break
                if r in self.running:
                    work[r.row] = n
                    budget -= n
                    if r.decoding:
                        decodes.append(r)
            for r in list(shown_waiting):
                if budget <= 0 or len(self.running) >= self.clients:
                    break
                n = min(r.total - r.computed, budget, self.max_chunk or budget)
                if not self._fits_whole(r) or not self._alloc(r, n):
                    break
                self.waiting.remove(r)
                self.running.append(r)
                work[r.row] = n
                budget -= n
        # execute: price the step as the simulator does
        kv = sum(r.computed for r in decodes)
        chunked = [r for r in self.running if r.row in work and r not in decodes]
        prompt_tokens = sum(work[r.row] for r in chunked)
        prefix = sum(r.computed for r in chunked)  # prompt tokens the chunks had cached before
        lat = self.latency
        if not work:
            dur = 0.0
        elif decodes:
            dur = lat.decode_time(len(decodes), kv) + lat.prefill_per_token_s * prompt_tokens
        else:
            dur = lat.prefill_time(prompt_tokens)
        if work:
            dur += lat.dense_attention_time(len(decodes) + prompt_tokens, kv + prefix)
        finished = {}
        for r in list(self.running):
            n = work.get(r.row)
            if n is None:
                continue
            r.computed += n
            if r.computed >= r.total:  # caught up: sample a token
                r.output.append(1000 * r.row + len(r.output))
                if len(r.output) >= r.max_tokens:
                    self.running.remove(r)
                    self.free += r.blocks
                    r.blocks = 0
                    finished[r.row] = list(r.output)
        self.max_used = max(self.max_used, self.blocks - self.free)
        self.steps += 1
        run.observe(self.k, work, dur, finished, preempted, plan)

    # -- memory ----------------------------------------------------------------------------------
    def _fits_whole(self, r: FakeRequest) -> bool:
        return True

    def _alloc(self, r: FakeRequest, n: int) -> bool:
        need = -(-(r.computed + n) // self.block_size) - r.blocks
        if need > self.free:
            return False
        if need > 0:
            self.free -= need
            r.blocks += need
        return True

    def _evict(self, r: FakeRequest) -> None:
        self.running.remove(r)
        self.free += r.blocks
        r.blocks = 0
        r.computed = 0  # recompute the prompt and the tokens generated so far, then decode on
        self.waiting.insert(0, r)
