"""Workloads: the GSM8K splits shipped with the package, case samplers, synthetic generators,
workflows of dependent requests (:func:`workflows`) and the Azure LLM inference traces of 2023
(:func:`azure_trace`: real arrival times and token counts).

The GSM8K token counts (``data/gsm8k_llama_tokens.csv``) were produced with the LLaMA tokenizer
(SentencePiece, 32k vocabulary): prompt ``Question: {q}\\nAnswer:`` with BOS, and the reference
solution without its calculator notes, plus EOS. GSM8K is MIT-licensed (``data/GSM8K_LICENSE``).
The Azure traces are CC BY 4.0 (``data/AZURE_LLM_TRACES_LICENSE``: source, citation, changes).
"""

from __future__ import annotations

import csv
import gzip
from functools import lru_cache
from importlib import resources

import numpy as np

from lloptim.errors import SpecError
from lloptim.problem import MAX_TOKENS, Workload
from lloptim.validation import MAX_SEED, check_choice, check_int, check_number, check_seed

__all__ = ["gsm8k", "gsm8k_cases", "gsm8k_case", "synthetic", "workflows", "azure_trace", "GSM8K_SPLITS",
           "WORKFLOW_SHAPES", "AZURE_TRACES", "MAX_REQUESTS", "SYNTHETIC_LIMITS"]

#: The GSM8K splits shipped with the package (1319 and 7473 requests).
GSM8K_SPLITS = ("test", "train")

#: Most requests one generated workload may hold (count); the spec has the same bound.
MAX_REQUESTS = 10_000_000

#: Bounds of the parameters of :func:`synthetic` (inclusive; ``open`` marks an excluded lower
#: bound). The spec's ``[workload]`` keys use the same table, so the Python API and the spec
#: accept exactly the same values.
SYNTHETIC_LIMITS = {
    "n": {"lo": 1, "hi": MAX_REQUESTS},
    "seed": {"lo": 0, "hi": MAX_SEED},
    "prompt_median": {"lo": 0, "hi": 1e6, "open": True},
    "output_median": {"lo": 0, "hi": 1e6, "open": True},
    "sigma": {"lo": 0, "hi": 10},
    "max_tokens": {"lo": 1, "hi": MAX_TOKENS},
    "arrival_rate": {"lo": 0, "hi": 1e9, "open": True},
}


def _check_synthetic(name: str, value, integer: bool = False):
    lim = SYNTHETIC_LIMITS[name]
    field = f"workload.{name}"
    if name == "seed":
        return check_seed(field, value)
    if integer:
        return check_int(field, value, lim["lo"], lim["hi"])
    return check_number(field, value, lim["lo"], lim["hi"], lo_open=lim.get("open", False),
                        example=1 if lim.get("open") else lim["lo"])


@lru_cache(maxsize=None)
def _gsm8k_table() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    text = (resources.files("lloptim") / "data" / "gsm8k_llama_tokens.csv").read_text()
    rows: dict[str, list[tuple[int, int, int]]] = {s: [] for s in GSM8K_SPLITS}
    for rec in csv.DictReader(text.splitlines()):
        rows[rec["split"]].append((int(rec["index"]), int(rec["prompt_tokens"]), int(rec["output_tokens"])))
    out = {}
    for split, recs in rows.items():
        recs.sort()
        arr = np.array(recs, dtype=np.int64)
        out[split] = (arr[:, 0], arr[:, 1], arr[:, 2])
    return out


def gsm8k(split: str = "test", limit: int | None = None) -> Workload:
    """The GSM8K ``split`` (``"test"``: 1319 requests, ``"train"``: 7473) with LLaMA token counts.

    Parameters
    ----------
    split
        ``"test"`` or ``"train"``.
    limit
        Keep only the first ``limit`` problems (in dataset order).

    Returns
    -------
    Workload
        All requests arrive at time 0; ids are ``"gsm8k-{split}-{index}"``.
    """
    check_choice("workload.split", split, GSM8K_SPLITS, "GSM8K split")
    idx, prompt, output = _gsm8k_table()[split]
    if limit is not None:
        limit = check_int("workload.limit", limit, 1, MAX_REQUESTS, fix="give how many requests to keep, e.g. limit=100")
        idx, prompt, output = idx[:limit], prompt[:limit], output[:limit]
    return Workload.from_arrays(prompt, output, ids=[f"gsm8k-{split}-{i}" for i in idx], name=f"gsm8k-{split}")


def gsm8k_cases(n_cases: int = 100, n_requests: int = 1319, seed: int = 0, split: str = "train") -> list[Workload]:
    """``n_cases`` case studies of ``n_requests`` requests drawn without replacement from GSM8K ``split``.

    Case ``k`` uses the generator ``numpy.random.default_rng([seed, k])``, so a case is the same
    whatever the number of cases drawn or the executor that runs it.

    Parameters
    ----------
    n_cases
        Number of cases.
    n_requests
        Requests per case (count).
    seed
        Seed shared by all cases.
    split
        GSM8K split drawn from (see :data:`GSM8K_SPLITS`).

    Returns
    -------
    list of Workload
        The cases in index order.

    Raises
    ------
    SpecError
        ``n_cases`` is negative, ``seed`` is not a seed, or :func:`gsm8k_case` refuses the rest.
    """
    n_cases = check_int("n_cases", n_cases, lo=0, example=100)
    check_seed("seed", seed)
    return [gsm8k_case(k, n_requests, seed, split) for k in range(n_cases)]


def gsm8k_case(index: int, n_requests: int = 1319, seed: int = 0, split: str = "train") -> Workload:
    """Case ``index`` of :func:`gsm8k_cases`: ``n_requests`` drawn with ``default_rng([seed, index])``.

    Parameters
    ----------
    index
        Case index.
    n_requests
        Requests in the case (count), at most the size of the split.
    seed
        Seed shared by all cases.
    split
        GSM8K split drawn from (see :data:`GSM8K_SPLITS`).

    Returns
    -------
    Workload
        The requests in draw order, named ``gsm8k-{split}-case{index}``; all arrive at time 0.

    Raises
    ------
    SpecError
        ``index`` is negative, ``seed`` is not a seed, ``n_requests`` is not in ``[1, len(split)]`` or
        the split is unknown.
    """
    check_int("index", index, lo=0, example=0)
    check_seed("seed", seed)
    check_choice("split", split, GSM8K_SPLITS, "GSM8K split")
    pool = gsm8k(split)
    check_int("n_requests", n_requests, 1, len(pool), fix=f"ask for 1 to {len(pool)} requests per case "
              f"(the {split} split has {len(pool)})")
    rows = np.random.default_rng([seed, index]).choice(len(pool), size=n_requests, replace=False)
    return pool.subset(rows, name=f"gsm8k-{split}-case{index}")


def synthetic(n: int, seed: int = 0, prompt_median: float = 70.0, output_median: float = 90.0,
              sigma: float = 0.5, max_tokens: int = 1024, arrival_rate: float | None = None) -> Workload:
    """A seeded synthetic workload with lognormal lengths and optional Poisson arrivals.

    Parameters
    ----------
    n
        Number of requests.
    seed
        Seed of ``numpy.random.default_rng``.
    prompt_median, output_median
        Medians of the lognormal prompt and output lengths, tokens.
    sigma
        Shape (log standard deviation) of both lognormals.
    max_tokens
        Lengths are clipped to ``[1, max_tokens]``.
    arrival_rate
        Poisson arrival rate, requests per second; ``None`` means all arrive at time 0.

    Raises
    ------
    SpecError
        A parameter outside :data:`SYNTHETIC_LIMITS` (named ``workload.<parameter>``, as the spec
        key), or a median above ``max_tokens`` (most lengths would be clipped).
    """
    n = _check_synthetic("n", n, integer=True)
    seed = _check_synthetic("seed", seed, integer=True)
    max_tokens = _check_synthetic("max_tokens", max_tokens, integer=True)
    medians = {}
    for name, value in (("prompt_median", prompt_median), ("output_median", output_median)):
        medians[name] = _check_synthetic(name, value)
        if medians[name] > max_tokens:
            raise SpecError(f"workload.{name}", f"{value!r} is above max_tokens = {max_tokens}: most lengths "
                            "would be clipped to max_tokens", "lower the median or raise workload.max_tokens")
    sigma = _check_synthetic("sigma", sigma)
    if arrival_rate is not None:
        arrival_rate = _check_synthetic("arrival_rate", arrival_rate)
    rng = np.random.default_rng(seed)
    prompt = np.clip(np.rint(rng.lognormal(np.log(medians["prompt_median"]), sigma, n)), 1, max_tokens)
    output = np.clip(np.rint(rng.lognormal(np.log(medians["output_median"]), sigma, n)), 1, max_tokens)
    arrival = None
    if arrival_rate is not None:
        arrival = np.cumsum(rng.exponential(1.0 / arrival_rate, n))
        if arrival[-1] > 1e9:
            raise SpecError("workload.arrival_rate", f"{arrival_rate!r} requests/s spreads {n} arrivals over "
                            f"{arrival[-1]:.3g} s, beyond the 1e9 s an arrival may be",
                            "raise arrival_rate or lower n")
    return Workload.from_arrays(prompt.astype(np.int64), output.astype(np.int64), arrival,
                                name=f"synthetic-{n}-s{seed}")


#: Workflow shapes of :func:`workflows`.
WORKFLOW_SHAPES = ("chain", "fan-in", "dag")

#: Tokens of the instruction each follow-up step adds to its prompt (a verifier's or reviser's
#: system text, a reducer's "combine these answers"), tokens.
STEP_INSTRUCTION_TOKENS = {"verify": 24, "revise": 20, "reduce": 28, "dag": 16}

#: Longest prompt a follow-up step is given, tokens: the context it inherits from its predecessors
#: is truncated to this (a serving stack would truncate or summarize it).
MAX_CONTEXT_TOKENS = 768


def workflows(shape: str = "chain", n_workflows: int = 100, seed: int = 0, split: str = "test",
              depth: int | None = None, width: int | None = None, arrival_rate: float | None = None) -> Workload:
    """Seeded workflows of dependent requests built on GSM8K token counts.

    Every step that consumes another step's answer has that answer in its prompt, so prompts grow
    along a workflow (capped at :data:`MAX_CONTEXT_TOKENS`). Shapes:

    * ``"chain"``: solve -> verify -> revise (``depth`` steps, default 3; longer chains alternate
      verify and revise). *Solve* is a GSM8K problem (its prompt and reference solution); *verify*
      reads the question and the latest solution and writes a short verdict (about a third of the
      solution, lognormal); *revise* reads question, solution and verdict and writes a new solution
      (the solution's length times a lognormal factor around 1).
    * ``"fan-in"``: map -> reduce. ``width`` GSM8K problems (default: 2 to 6, drawn per workflow) are
      the map steps; one *reduce* step reads all their answers and writes a combined answer about
      1.2 times the longest of them.
    * ``"dag"``: random layered DAGs, ``depth`` layers (default 4) of 1 to ``width`` requests
      (default 4); each request after the first layer depends on 1 to 3 requests of the layer
      before and, with probability 0.2, on one more of any earlier layer. Each is a GSM8K problem
      whose prompt also carries its predecessors' answers.

    Parameters
    ----------
    shape
        One of :data:`WORKFLOW_SHAPES`.
    n_workflows
        Number of workflows (count).
    seed
        Seed of ``numpy.random.default_rng``.
    split
        GSM8K split the lengths are drawn from (with replacement when it is too small).
    depth
        Steps of a chain, or layers of a DAG (count, >= 1; not for ``"fan-in"``).
    width
        Map steps of every fan-in workflow, or the most requests in a DAG layer (count, >= 1).
    arrival_rate
        Poisson arrival rate of whole workflows, per second: all requests of a workflow arrive
        together (its later steps still wait for their predecessors). None: all at time 0.

    Returns
    -------
    Workload
        Ids ``"{shape}-{w}-{step}"``; named ``"{shape}-{n_workflows}-s{seed}"``.

    Raises
    ------
    SpecError
        An unknown shape or an out-of-range count.
    """
    if shape not in WORKFLOW_SHAPES:
        raise SpecError("workload.shape", f"unknown workflow shape {shape!r}", f"use one of {list(WORKFLOW_SHAPES)}")
    # the bounds of the spec's keys, so the Python API refuses what a spec would
    for fld, v, hi in (("workflows", n_workflows, 1_000_000), ("depth", depth, 10_000), ("width", width, 10_000)):
        if v is None and fld != "workflows":
            continue
        check_int(f"workload.{fld}", v, 1, hi, fix=f"give the {fld} as a count, 1 to {hi:,}")
    seed = check_seed("workload.seed", seed)
    if arrival_rate is not None:
        arrival_rate = _check_synthetic("arrival_rate", arrival_rate)
    # the most requests one workflow can have: refuse a workload beyond MAX_REQUESTS before drawing it
    per = {"chain": depth or 3, "fan-in": (width or 6) + 1, "dag": (depth or 4) * (width or 4)}[shape]
    if n_workflows * per > MAX_REQUESTS:
        raise SpecError("workload.workflows", f"{n_workflows:,} workflows of up to {per:,} requests could make "
                        f"{n_workflows * per:,} requests, more than {MAX_REQUESTS:,}",
                        f"use at most {MAX_REQUESTS // per:,} workflows of this shape, or smaller ones")
    if shape == "fan-in" and depth is not None:
        raise SpecError("workload.depth", "a fan-in workflow has two stages (map, reduce)",
                        "remove depth, or use shape = 'chain' or 'dag'")
    if arrival_rate is not None and not arrival_rate > 0:
        raise SpecError("workload.arrival_rate", f"must be > 0, got {arrival_rate!r}", "give workflows per second")
    if split not in GSM8K_SPLITS:
        raise SpecError("workload.split", f"unknown GSM8K split {split!r}", f"use one of {list(GSM8K_SPLITS)}")
    rng = np.random.default_rng(seed)
    _, pool_p, pool_o = _gsm8k_table()[split]
    starts = np.zeros(n_workflows) if arrival_rate is None else np.cumsum(rng.exponential(1.0 / arrival_rate,
                                                                                         n_workflows))
    prompt: list[int] = []
    output: list[int] = []
    ids: list[str] = []
    after: list[list[str]] = []
    arrival: list[float] = []

    def draw() -> tuple[int, int]:
        i = int(rng.integers(len(pool_p)))
        return int(pool_p[i]), int(pool_o[i])

    def add(rid: str, p: int, o: int, preds: list[str], t: float) -> None:
        ids.append(rid)
        prompt.append(int(min(max(p, 1), MAX_CONTEXT_TOKENS)))
        output.append(int(max(o, 1)))
        after.append(preds)
        arrival.append(t)

    for wf in range(n_workflows):
        t = float(starts[wf])
        if shape == "chain":
            steps = 3 if depth is None else int(depth)
            q, sol = draw()
            add(f"chain-{wf}-solve", q, sol, [], t)
            prev, verdict = f"chain-{wf}-solve", 0
            for k in range(1, steps):
                if k % 2 == 1:
                    verdict = max(8, int(round(sol * rng.lognormal(np.log(0.35), 0.4))))
                    rid = f"chain-{wf}-verify" + (f"-{k // 2 + 1}" if steps > 3 else "")
                    add(rid, q + sol + STEP_INSTRUCTION_TOKENS["verify"], verdict, [prev], t)
                else:
                    new = max(8, int(round(sol * rng.lognormal(0.0, 0.25))))
                    rid = f"chain-{wf}-revise" + (f"-{k // 2}" if steps > 3 else "")
                    add(rid, q + sol + verdict + STEP_INSTRUCTION_TOKENS["revise"], new, [prev], t)
                    sol = new
                prev = rid
        elif shape == "fan-in":
            k = int(rng.integers(2, 7)) if width is None else int(width)
            outs = []
            maps = []
            for j in range(k):
                p, o = draw()
                maps.append(f"fanin-{wf}-map-{j}")
                add(maps[-1], p, o, [], t)
                outs.append(o)
            reduce_out = max(8, int(round(max(outs) * rng.lognormal(np.log(1.2), 0.25))))
            add(f"fanin-{wf}-reduce", sum(outs) + STEP_INSTRUCTION_TOKENS["reduce"], reduce_out, maps, t)
        else:
            layers = 4 if depth is None else int(depth)
            most = 4 if width is None else int(width)
            made: list[list[tuple[str, int]]] = []
            for lv in range(layers):
                layer = []
                for j in range(int(rng.integers(1, most + 1))):
                    p, o = draw()
                    rid = f"dag-{wf}-{lv}-{j}"
                    preds: list[tuple[str, int]] = []
                    if lv:
                        prev_layer = made[-1]
                        m = int(rng.integers(1, min(3, len(prev_layer)) + 1))
                        preds = [prev_layer[i] for i in rng.choice(len(prev_layer), size=m, replace=False)]
                        if lv > 1 and rng.random() < 0.2:
                            earlier = [x for layer_ in made[:-1] for x in layer_]
                            preds.append(earlier[int(rng.integers(len(earlier)))])
                        p += sum(o_ for _, o_ in preds) + STEP_INSTRUCTION_TOKENS["dag"]
                    add(rid, p, o, [x for x, _ in preds], t)
                    layer.append((rid, o))
                made.append(layer)
    return Workload.from_arrays(np.asarray(prompt, dtype=np.int64), np.asarray(output, dtype=np.int64),
                                np.asarray(arrival), ids=ids, name=f"{shape}-{n_workflows}-s{seed}", after=after)


#: The Azure LLM inference traces of 2023 shipped with the package: conversation (19,366 requests
#: over 3,502 s) and code (8,819 requests over 3,436 s).
AZURE_TRACES = ("conv", "code")


@lru_cache(maxsize=None)
def _azure_table(trace: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    raw = (resources.files("lloptim") / "data" / f"azure_llm_{trace}_2023.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", skiprows=1)
    arrival, prompt, output = table[:, 0], table[:, 1].astype(np.int64), table[:, 2].astype(np.int64)
    for a in (arrival, prompt, output):
        a.setflags(write=False)
    return arrival, prompt, output


def azure_trace(trace: str = "conv", limit: int | None = None, start: int = 0,
                time_scale: float = 1.0) -> Workload:
    """Requests of an Azure LLM inference trace (2023) with their real arrival times.

    The traces of Patel et al. (*Splitwise*, ISCA 2024; AzurePublicDataset, CC BY 4.0, see
    ``data/AZURE_LLM_TRACES_LICENSE``) record, for every request to two production LLM services
    over about an hour, its arrival time and its prompt (context) and output (generated) token
    counts. Prompts run up to 14,050 tokens (conversation) and 7,437 (code): size the instances'
    KV caches for them (the llama-65b profile's 20,480 tokens for 40 clients is the paper's
    GSM8K configuration; see the arrivals benchmark for the one lloptim uses).

    Parameters
    ----------
    trace
        ``"conv"`` (conversation, 19,366 requests) or ``"code"`` (8,819 requests).
    limit
        Keep ``limit`` consecutive requests from ``start`` (count); None: to the end.
    start
        Index of the first request kept (count, in arrival order); different starts give
        different windows of the same service.
    time_scale
        Multiply the inter-arrival times by this (dimensionless, > 0): 0.5 doubles the arrival
        rate. :func:`lloptim.arrivals.scale_to_load` picks it for a target load.

    Returns
    -------
    Workload
        Arrivals shifted so the first kept request arrives at 0, seconds; ids
        ``"azure-{trace}-{index}"``; named ``"azure-{trace}[{start}:{stop}]"``.

    Raises
    ------
    SpecError
        Unknown trace, a window outside the trace, or a non-positive time scale.
    """
    check_choice("workload.trace", trace, AZURE_TRACES, "Azure trace")
    arrival, prompt, output = _azure_table(trace)
    n = arrival.size
    start = check_int("workload.start", start, 0, n - 1, fix=f"the {trace} trace has {n} requests: give a start "
                      f"in 0..{n - 1}")
    if limit is not None:
        limit = check_int("workload.limit", limit, 1, MAX_REQUESTS, fix="give how many requests to keep, e.g. 1000")
    time_scale = check_number("workload.time_scale", time_scale, 0, 1e6, lo_open=True,
                              fix="give a factor on the inter-arrival times, e.g. 0.5 to double the arrival rate")
    stop = n if limit is None else min(n, start + int(limit))
    t = (arrival[start:stop] - arrival[start]) * float(time_scale)
    return Workload.from_arrays(prompt[start:stop], output[start:stop], t,
                                ids=[f"azure-{trace}-{i}" for i in range(start, stop)],
                                name=f"azure-{trace}[{start}:{stop}]")
