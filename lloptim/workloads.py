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
from lloptim.problem import MAX_TOKENS, Workload
from lloptim.validation import MAX_SEED, check_choice, check_int, check_number, check_seed

__all__ = ["gsm8k", "gsm8k_cases", "gsm8k_case", "synthetic", "GSM8K_SPLITS", "MAX_REQUESTS", "SYNTHETIC_LIMITS"]

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
