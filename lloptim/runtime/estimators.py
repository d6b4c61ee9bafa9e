"""Output-length estimators for the unknown-lengths case.

Online, a request's true output length is revealed only when it ends; the schedulers plan with
estimates. Every estimator is fitted on a *training* workload (never on the requests being
scheduled) and predicts from what is known when a request arrives: its prompt length.

* ``oracle``: the truth (the known-lengths case).
* ``mean``: the training mean output length.
* ``regression``: least squares ``output ~ a + b * prompt``.
* ``bucket-quantile``: a quantile (default the median) of the output length within each prompt-
  length bucket (deciles of the training prompts).
* ``noisy``: the truth times lognormal noise ``exp(N(0, sigma))``: a controlled-quality forecast.

:func:`training_workload` picks what a fitted estimator learns from when the caller gives nothing:
the GSM8K train split for requests that carry GSM8K lengths (the train split never holds a test
request, and a case drawn from the train split loses its own requests, see :func:`estimate`); for
a window of an Azure trace, the rest of the same trace (the service's other requests, a held-out
part of the same workload); for anything else (synthetic, a user's requests), the GSM8K train
split, i.e. a model fitted on other traffic, as a server deployed on a new workload would have.
Give your own training requests (``simulate --train SPEC``) to do better.
"""

from __future__ import annotations

import numpy as np

from lloptim.errors import SpecError
from lloptim.problem import Workload

__all__ = ["Estimator", "MeanEstimator", "RegressionEstimator", "BucketQuantileEstimator", "make_estimator",
           "estimate", "noisy_estimates", "training_workload", "estimate_quality", "ESTIMATORS", "ESTIMATOR_NAMES",
           "INFORMATIVE_RANK_CORRELATION", "BIASED_RATIO"]

#: Spearman rank correlation between estimates and true lengths below which
#: :func:`estimate_quality` calls the estimates barely informative. A policy that orders by
#: estimates then orders almost at random: on synthetic workloads whose outputs do not depend on
#: the prompt, GSM8K-trained prompt-bucket estimates correlate 0.0-0.1 with the truth, noisy
#: estimates of sigma 0.5 about 0.8 (lead's audit, seeds 7-9).
INFORMATIVE_RANK_CORRELATION = 0.2

#: Median of estimate / truth outside ``[1 / BIASED_RATIO, BIASED_RATIO]`` calls the estimates
#: biased (a median forecast 2x off in either direction).
BIASED_RATIO = 2.0


class Estimator:
    """Fit on training requests, predict output lengths (tokens) of others from their prompts."""

    name = "estimator"

    def fit(self, train: Workload) -> "Estimator":
        """Learn from ``train`` (prompt and true output lengths)."""
        return self

    def predict(self, workload: Workload) -> np.ndarray:
        """Estimated output length of each request of ``workload``, tokens (float64, >= 1)."""
        raise NotImplementedError


class MeanEstimator(Estimator):
    """Every request gets the training mean output length."""

    name = "mean"

    def fit(self, train: Workload) -> "MeanEstimator":
        self.mean_ = float(train.output_tokens.mean())
        return self

    def predict(self, workload: Workload) -> np.ndarray:
        return np.full(len(workload), max(1.0, self.mean_))


class RegressionEstimator(Estimator):
    """Least-squares line ``output = a + b * prompt_tokens`` fitted on the training split."""

    name = "regression"

    def fit(self, train: Workload) -> "RegressionEstimator":
        x = train.prompt_tokens.astype(np.float64)
        A = np.column_stack([np.ones_like(x), x])
        self.coef_ = np.linalg.lstsq(A, train.output_tokens.astype(np.float64), rcond=None)[0]
        return self

    def predict(self, workload: Workload) -> np.ndarray:
        return np.maximum(1.0, self.coef_[0] + self.coef_[1] * workload.prompt_tokens)


class BucketQuantileEstimator(Estimator):
    """A quantile of the output length per prompt-length bucket (training-prompt quantile edges).

    Parameters
    ----------
    quantile
        Which quantile of the outputs in a bucket to predict (0.5: the median).
    buckets
        Number of buckets (edges at equally spaced quantiles of the training prompts).
    """

    name = "bucket-quantile"

    def __init__(self, quantile: float = 0.5, buckets: int = 10) -> None:
        if not 0 < quantile < 1 or buckets < 1:
            raise SpecError("estimator", "quantile must be in (0, 1) and buckets >= 1", "e.g. quantile=0.5, buckets=10")
        self.quantile = quantile
        self.buckets = buckets

    def fit(self, train: Workload) -> "BucketQuantileEstimator":
        p, o = train.prompt_tokens, train.output_tokens
        self.edges_ = np.unique(np.quantile(p, np.linspace(0, 1, self.buckets + 1)[1:-1]))
        idx = np.searchsorted(self.edges_, p, side="right")
        overall = float(np.quantile(o, self.quantile))
        self.values_ = np.array([float(np.quantile(o[idx == b], self.quantile)) if np.any(idx == b) else overall
                                 for b in range(self.edges_.size + 1)])
        return self

    def predict(self, workload: Workload) -> np.ndarray:
        idx = np.searchsorted(self.edges_, workload.prompt_tokens, side="right")
        return np.maximum(1.0, self.values_[idx])


#: Fitted estimators by name: estimator class, constructed with the options of :func:`make_estimator`.
ESTIMATORS = {"mean": MeanEstimator, "regression": RegressionEstimator, "bucket-quantile": BucketQuantileEstimator}


#: Every name :func:`estimate` accepts.
ESTIMATOR_NAMES = ("oracle", "noisy", *ESTIMATORS)


def training_workload(workload: Workload) -> Workload:
    """The default training requests for estimating ``workload``'s output lengths (module docstring).

    Parameters
    ----------
    workload
        The requests to estimate (their ids tell where they come from).

    Returns
    -------
    Workload
        The rest of the Azure trace for a window of one (every id ``azure-{trace}-{index}``), else
        the GSM8K train split.
    """
    from lloptim import workloads

    for trace in workloads.AZURE_TRACES:
        prefix = f"azure-{trace}-"
        if all(i.startswith(prefix) for i in workload.ids):
            full = workloads.azure_trace(trace)
            own = set(workload.ids)
            rest = np.array([i for i, x in enumerate(full.ids) if x not in own], dtype=np.int64)
            if rest.size:
                return full.subset(rest, name=f"azure-{trace} (held out)")
    return workloads.gsm8k("train")


def estimate_quality(truth: np.ndarray, estimates: np.ndarray) -> tuple[float, float]:
    """How well ``estimates`` forecast ``truth``: the median ratio and the rank correlation.

    What a policy that orders or packs by estimates needs is their order (rank correlation) and
    their scale (median ratio); a mean error would mix both and be ruled by the heavy tail.

    Parameters
    ----------
    truth
        True output lengths, tokens (one per request).
    estimates
        Estimated output lengths, tokens (same shape, > 0).

    Returns
    -------
    tuple of float
        ``(median of estimates / truth, Spearman rank correlation)``; the correlation is NaN
        when either side is constant (no order to compare) and both are NaN for no requests.
    """
    truth = np.asarray(truth, dtype=np.float64)
    estimates = np.asarray(estimates, dtype=np.float64)
    if truth.shape != estimates.shape:
        raise SpecError("estimates", f"{estimates.shape[0] if estimates.ndim else 0} estimates for {truth.size} "
                        "requests", "give one estimate per request")
    if truth.size == 0:
        return float("nan"), float("nan")
    ratio = float(np.median(estimates / np.maximum(truth, 1.0)))
    if np.ptp(truth) == 0 or np.ptp(estimates) == 0:
        return ratio, float("nan")
    from scipy.stats import spearmanr

    return ratio, float(spearmanr(estimates, truth).statistic)


def make_estimator(name: str, **options) -> Estimator:
    """An unfitted estimator by name (``mean``, ``regression``, ``bucket-quantile``)."""
    if name not in ESTIMATORS:
        raise SpecError("estimator", f"unknown estimator {name!r}", f"use one of {sorted(ESTIMATORS)}, 'oracle' or 'noisy'")
    return ESTIMATORS[name](**options)


def noisy_estimates(workload: Workload, sigma: float, seed: int = 0) -> np.ndarray:
    """The true output lengths times ``exp(N(0, sigma))`` noise, tokens (>= 1).

    Parameters
    ----------
    workload
        The requests whose true output lengths are perturbed.
    sigma
        Standard deviation of the noise on the log scale (0: the truth).
    seed
        Seed of the noise.

    Returns
    -------
    numpy.ndarray
        One estimate per request, tokens (float64, >= 1).

    Raises
    ------
    SpecError
        ``sigma`` is negative or NaN.
    """
    if not sigma >= 0:
        raise SpecError("noise", f"sigma must be >= 0, got {sigma!r}", "give a log-scale standard deviation such as 0.3")
    rng = np.random.default_rng(seed)
    return np.maximum(1.0, workload.output_tokens * np.exp(rng.normal(0.0, sigma, len(workload))))


def estimate(workload: Workload, name: str, train: Workload | None = None, sigma: float = 0.0,
             seed: int = 0) -> np.ndarray | None:
    """Estimates for ``workload`` by estimator ``name``; ``None`` for ``oracle`` (the truth).

    ``train`` must not contain the requests of ``workload``; a training request that *is* one of
    them (the same id, prompt and output length) is dropped from it, so a case drawn from the
    training split never sees its own lengths. Only the same id is not enough: two specs that list
    their requests without ids both number them 0, 1, ..., and a training spec's request 3 is not
    the scheduled spec's request 3.

    Parameters
    ----------
    workload
        The requests to estimate.
    name
        ``"oracle"``, ``"noisy"`` or a name of :data:`ESTIMATORS`.
    train
        Training requests for the fitted estimators (unused by ``oracle`` and ``noisy``).
    sigma
        Log-scale noise of ``noisy`` (see :func:`noisy_estimates`).
    seed
        Seed of ``noisy``.

    Returns
    -------
    numpy.ndarray or None
        One estimated output length per request, tokens (float64, >= 1); None for ``oracle``.

    Raises
    ------
    SpecError
        Unknown estimator, a fitted estimator without ``train``, or ``train`` holding only the
        requests of ``workload``.
    """
    if name == "oracle":
        return None
    if name == "noisy":
        return noisy_estimates(workload, sigma, seed)
    if train is None:
        raise SpecError("train", f"estimator {name!r} needs a training workload", "pass train=workloads.gsm8k('train')")
    own = set(zip(workload.ids, workload.prompt_tokens.tolist(), workload.output_tokens.tolist()))
    keep = np.array([i for i, key in enumerate(zip(train.ids, train.prompt_tokens.tolist(), train.output_tokens.tolist()))
                     if key not in own], dtype=np.int64)
    if keep.size == 0:
        raise SpecError("train", "the training workload holds only the requests being scheduled",
                        "train on other requests")
    if keep.size < len(train):
        train = train.subset(keep)
    return make_estimator(name).fit(train).predict(workload)
