"""Workloads: the GSM8K splits shipped with the package, case samplers and synthetic generators.

The GSM8K token counts (``data/gsm8k_llama_tokens.csv``) were produced with the LLaMA tokenizer
(SentencePiece, 32k vocabulary): prompt ``Question: {q}\\nAnswer:`` with BOS, and the reference
solution without its calculator notes, plus EOS. GSM8K is MIT-licensed (``data/GSM8K_LICENSE``).
"""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources

import numpy as np

from lloptim.errors import SpecError
from lloptim.problem import Workload

__all__ = ["gsm8k", "gsm8k_cases", "gsm8k_case", "synthetic", "GSM8K_SPLITS"]

#: The GSM8K splits shipped with the package (1319 and 7473 requests).
GSM8K_SPLITS = ("test", "train")


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
    if split not in GSM8K_SPLITS:
        raise SpecError("workload.split", f"unknown GSM8K split {split!r}", f"use one of {list(GSM8K_SPLITS)}")
    idx, prompt, output = _gsm8k_table()[split]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
            raise SpecError("workload.limit", f"must be a positive integer, got {limit!r}", "give how many requests to keep")
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
    """
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
        ``n_requests`` is not in ``[1, len(split)]`` or the split is unknown.
    """
    pool = gsm8k(split)
    if not 1 <= n_requests <= len(pool):
        raise SpecError("n_requests", f"{n_requests} is not in [1, {len(pool)}] for the {split} split",
                        f"ask for at most {len(pool)} requests per case")
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
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SpecError("workload.n", f"must be a positive integer, got {n!r}", "give the number of requests")
    if not (sigma >= 0 and prompt_median > 0 and output_median > 0):
        raise SpecError("workload.sigma", "medians must be > 0 and sigma >= 0", "check the synthetic parameters")
    rng = np.random.default_rng(seed)
    prompt = np.clip(np.rint(rng.lognormal(np.log(prompt_median), sigma, n)), 1, max_tokens)
    output = np.clip(np.rint(rng.lognormal(np.log(output_median), sigma, n)), 1, max_tokens)
    arrival = None
    if arrival_rate is not None:
        if not arrival_rate > 0:
            raise SpecError("workload.arrival_rate", f"must be > 0, got {arrival_rate!r}", "give requests per second")
        arrival = np.cumsum(rng.exponential(1.0 / arrival_rate, n))
    return Workload.from_arrays(prompt.astype(np.int64), output.astype(np.int64), arrival,
                                name=f"synthetic-{n}-s{seed}")
