"""Calibration: measure a real backend's iteration times and fit the simulator's latency model.

:func:`calibrate` times the torch backend's own ``prefill`` and ``decode`` iterations (the very
code a real run executes, cache gathering included) over a grid, after a warm-up, repeating every
grid point and keeping the median:

* prefill: ``batch`` prompts of ``length`` tokens each, for every ``(batch, length)`` in the grid;
  the predictor is the total prompt tokens;
* decode: ``batch`` running requests whose caches hold ``context`` tokens each, for every
  ``(batch, context)``; the predictors are the batch size and the KV tokens;
* transfer: one running request whose cache holds ``length`` tokens moved between two replicas
  (:meth:`~lloptim.backends.torch_backend.TorchBackend.migrate`), for every prefill length; the
  predictor is the KV tokens (``kv_transfer_base_s``, ``kv_transfer_per_token_s``);
* swap: the same request's cache copied to host memory and back
  (:meth:`~lloptim.backends.torch_backend.TorchBackend.swap_out` and ``swap_in``), for every prefill
  length; the time of one copy is fitted as proportional to the KV tokens (``kv_swap_per_token_s``),
  which ``preemption="swap"`` needs.

:func:`fit_prefill` and :func:`fit_decode` then fit the five :class:`~lloptim.hardware.LatencyModel`
coefficients by non-negative least squares (:func:`scipy.optimize.nnls`) on *relative* residuals
(each row divided by its measured time), so short and long iterations weigh alike:

* ``t_prefill = prefill_base_s + prefill_per_token_s * tokens``
* ``t_decode = decode_base_s + decode_per_seq_s * batch + decode_per_kv_token_s * kv_tokens``

The result converts to a :class:`~lloptim.hardware.HardwareProfile` the simulator loads.

**Serving engines** (vLLM, transformers' continuous batching) are calibrated from their own step
timings, not from a separate micro-benchmark: :func:`calibrate_engine` serves a calibration
workload (GSM8K *train* requests, never the test requests a benchmark then predicts) under a few
policies that between them produce prefill, decode and mixed steps of many shapes, and
:func:`fit_engine_steps` fits all five coefficients at once to every step the engine ran:

* a prefill step (prompts only): ``prefill_base_s + prefill_per_token_s * prompt_tokens``;
* a decode step: ``decode_base_s + decode_per_seq_s * decodes + decode_per_kv_token_s * kv_tokens``;
* a mixed step (prompt chunks fused into a decode): the decode plus ``prefill_per_token_s * prompt_tokens``,
* and, for an engine whose attention is one dense masked matrix over the whole batch (transformers'
  paged ``sdpa`` path: ``dense_attention`` on the engine), every step also
  ``dense_attention_per_pair_s * Q * (Q + K)``, ``Q`` its query tokens (decodes plus prompt tokens)
  and ``K`` the cached tokens it reads. Without this term the fit, dominated by decode steps, put
  transformers' mixed steps about 30 % under their measured time (engine-default and hybrid-fused
  runs predicted 10-18 % short);

which is how the simulator prices the same steps. Steps are grouped by shape (kind, decodes,
quarter-octave buckets of prompt and KV tokens) and each group enters the non-negative least
squares with its median time, weighted by the square root of its size, so a step that a busy
machine stalled does not move the fit (:func:`fit_steps`, on arrays of steps).

:func:`calibrate_serving` does the same for lloptim's own torch backend, from the steps it records
(:class:`TorchBackend.steps <lloptim.backends.torch_backend.TorchBackend>`): it predicts the
backend's runs better than the grid, which times uniform batches of one kind at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lloptim.errors import SpecError
from lloptim.hardware import HardwareProfile, LatencyModel

__all__ = ["CalibrationPoint", "Calibration", "fit_prefill", "fit_decode", "calibrate", "fit_engine_steps",
           "calibrate_engine", "calibration_workload", "CALIBRATION_POLICIES", "DEFAULT_KV_CAPACITY_TOKENS",
           "DEFAULT_CLIENTS", "fit_steps", "calibrate_serving", "SERVING_CALIBRATION_POLICIES", "price_steps",
           "engine_steps"]

#: KV capacity written into a calibrated profile unless told otherwise, tokens.
DEFAULT_KV_CAPACITY_TOKENS = 16384
#: Clients (concurrent request slots) written into a calibrated profile unless told otherwise.
DEFAULT_CLIENTS = 8
#: Policies an engine calibration serves its workload under: the engine's own mixed steps, the
#: baseline's separate prefills of one to a few prompts, the hybrid's batched prefills.
CALIBRATION_POLICIES = ("engine-default", "baseline", "hybrid")


@dataclass(frozen=True)
class CalibrationPoint:
    """One grid point: the median measured time and the fitted model's prediction.

    Attributes
    ----------
    kind
        ``"prefill"``, ``"decode"``, ``"mixed"`` (engine steps), ``"transfer"`` or ``"swap"``.
    batch
        Requests in the iteration (prefill: prompts; decode and mixed: decoding requests).
    tokens
        Prefill and mixed: prompt tokens; decode: KV tokens held before the step (median over
        repeats); transfer and swap: KV tokens moved (a swap point times one copy, out or in).
    seconds
        Median measured time, seconds.
    predicted_s
        The fitted model's time, seconds.
    kv_tokens
        Mixed engine steps: KV tokens the decoding requests held before the step (0 otherwise).
    count
        Measurements behind the median (engine steps of this shape; 1 for a grid point).
    """

    kind: str
    batch: int
    tokens: float
    seconds: float
    predicted_s: float
    kv_tokens: float = 0.0
    count: int = 1

    @property
    def rel_error(self) -> float:
        """``(predicted - measured) / measured``."""
        return (self.predicted_s - self.seconds) / self.seconds


@dataclass
class Calibration:
    """A fitted latency model with the measurements behind it.

    Attributes
    ----------
    latency
        The fitted coefficients, seconds.
    points
        Every grid point, prefill first.
    r2_prefill, r2_decode
        Coefficient of determination of each fit (on seconds).
    model, device, dtype
        What was measured.
    clock
        ``"wall"`` or ``"cpu"``: the clock the times were measured with (see
        :class:`~lloptim.backends.torch_backend.TorchBackend`).
    wall_s
        Time the calibration took, seconds.
    extra
        Free-form notes of the caller; :func:`calibrate` leaves it empty and neither
        :meth:`to_profile` nor :meth:`to_dict` writes it.
    """

    latency: LatencyModel
    points: list[CalibrationPoint]
    r2_prefill: float
    r2_decode: float
    model: str = ""
    device: str = ""
    dtype: str = ""
    clock: str = "wall"
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def max_rel_error(self) -> float:
        """Largest ``|relative error|`` over the prefill and decode grid points (the iteration model)."""
        return max(abs(p.rel_error) for p in self.points if p.kind not in ("transfer", "swap"))

    @property
    def mean_rel_error(self) -> float:
        """Mean ``|relative error|`` over the prefill and decode grid points."""
        return float(np.mean([abs(p.rel_error) for p in self.points if p.kind not in ("transfer", "swap")]))

    def to_profile(self, name: str | None = None, kv_capacity_tokens: int = DEFAULT_KV_CAPACITY_TOKENS,
                   clients: int = DEFAULT_CLIENTS) -> HardwareProfile:
        """The :class:`HardwareProfile` of this calibration (KV capacity in tokens, clients per instance).

        Parameters
        ----------
        name
            Profile name; default ``<model directory name>-<device>``.
        kv_capacity_tokens
            KV-cache capacity written into the profile, tokens (not measured by the calibration).
        clients
            Clients (concurrent request slots) per instance written into the profile.

        Returns
        -------
        HardwareProfile
            The fitted latency model, with the fit quality and clock in its ``meta``.
        """
        return HardwareProfile(
            name=name or f"{Path(self.model).name}-{self.device}",
            latency=self.latency, kv_capacity_tokens=int(kv_capacity_tokens), clients=int(clients),
            description=f"lloptim calibrate: {self.model} on {self.device} ({self.dtype}), NNLS fit of "
                        f"{len(self.points)} grid points",
            meta={"model": self.model, "device": self.device, "dtype": self.dtype, "clock": self.clock,
                  "r2_prefill": self.r2_prefill, "r2_decode": self.r2_decode,
                  "max_rel_error": self.max_rel_error, "mean_rel_error": self.mean_rel_error},
        )

    def to_dict(self) -> dict:
        """A JSON-ready summary: coefficients, fit quality and every grid point."""
        return {
            "model": self.model, "device": self.device, "dtype": self.dtype, "clock": self.clock,
            "wall_s": self.wall_s,
            "latency": self.latency.coefficients(),
            "r2_prefill": self.r2_prefill, "r2_decode": self.r2_decode,
            "max_rel_error": self.max_rel_error, "mean_rel_error": self.mean_rel_error,
            "points": [{"kind": p.kind, "batch": p.batch, "tokens": p.tokens, "seconds": p.seconds,
                        "predicted_s": p.predicted_s, "rel_error": p.rel_error, "kv_tokens": p.kv_tokens,
                        "count": p.count} for p in self.points],
        }


def _nnls_relative(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative ``x`` minimizing ``sum(((a @ x - y) / y) ** 2)``, and the R^2 of ``a @ x`` vs ``y``."""
    from scipy.optimize import nnls

    y = np.asarray(y, dtype=np.float64)
    if y.size < a.shape[1] or np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise SpecError("calibration", f"need at least {a.shape[1]} positive finite times, got {y.size}",
                        "use a larger grid")
    x, _ = nnls(a / y[:, None], np.ones_like(y))
    pred = a @ x
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else 1.0
    return x, r2


def fit_prefill(tokens: Sequence[float], seconds: Sequence[float]) -> tuple[float, float, float]:
    """Fit ``seconds = base + per_token * tokens`` (both >= 0); return ``(base_s, per_token_s, r2)``.

    Parameters
    ----------
    tokens
        Prompt tokens of each measured prefill, tokens.
    seconds
        Measured time of each prefill, seconds (positive, finite).

    Returns
    -------
    tuple
        ``(base_s, per_token_s, r2)``: seconds, seconds per token, and the R^2 on seconds.

    Raises
    ------
    SpecError
        Fewer than two measurements, or a time that is not positive and finite.
    """
    t = np.asarray(tokens, dtype=np.float64)
    x, r2 = _nnls_relative(np.column_stack([np.ones_like(t), t]), seconds)
    return float(x[0]), float(x[1]), r2


def fit_decode(batch: Sequence[float], kv_tokens: Sequence[float],
               seconds: Sequence[float]) -> tuple[float, float, float, float]:
    """Fit ``seconds = base + per_seq * batch + per_kv * kv_tokens`` (all >= 0).

    Parameters
    ----------
    batch
        Running requests in each measured decode step (count).
    kv_tokens
        KV tokens held before each step, tokens.
    seconds
        Measured time of each step, seconds (positive, finite).

    Returns
    -------
    tuple
        ``(base_s, per_seq_s, per_kv_token_s, r2)``: seconds, seconds per running request, seconds
        per KV token, and the R^2 on seconds.

    Raises
    ------
    SpecError
        Fewer than three measurements, or a time that is not positive and finite.
    """
    n = np.asarray(batch, dtype=np.float64)
    kv = np.asarray(kv_tokens, dtype=np.float64)
    x, r2 = _nnls_relative(np.column_stack([np.ones_like(n), n, kv]), seconds)
    return float(x[0]), float(x[1]), float(x[2]), r2


def _grid(name: str, values: Sequence[int]) -> list[int]:
    vals = [int(v) for v in values]
    if not vals or any(v < 1 for v in vals):
        raise SpecError(name, f"must be a non-empty list of positive integers, got {list(values)!r}",
                        "give e.g. 1,2,4,8")
    return vals


def calibrate(model="tiny-llama", device: str = "auto", dtype: str | None = None, seed: int = 0,
              prefill_batches: Sequence[int] = (1, 2, 4, 8), prefill_lengths: Sequence[int] = (4, 16, 32, 64),
              decode_batches: Sequence[int] = (1, 2, 4, 8, 16), decode_contexts: Sequence[int] = (8, 32, 96),
              repeats: int = 5, warmup: int = 3, clock: str = "wall") -> Calibration:
    """Measure the torch backend over a grid and fit the latency model.

    Parameters
    ----------
    model
        ``"tiny-llama"``, a local model directory, or a loaded model
        (:class:`~lloptim.backends.models.LoadedModel`).
    device, dtype, seed
        As for :class:`~lloptim.backends.torch_backend.TorchBackend`.
    prefill_batches, prefill_lengths
        Prefill grid: prompts per iteration and tokens per prompt.
    decode_batches, decode_contexts
        Decode grid: running requests and tokens in each one's cache when the measurement starts.
    repeats
        Timed repetitions per grid point (the median is kept).
    warmup
        Untimed iterations before the grid (and untimed decode steps per decode point).
    clock
        ``"wall"`` or ``"cpu"`` seconds, as for the backend (calibrate with the clock you run with).

    Returns
    -------
    Calibration
        The fit, its R^2 and relative error per grid point.
    """
    from lloptim.backends.models import LoadedModel, load_model
    from lloptim.backends.torch_backend import TorchBackend
    from lloptim.problem import Problem, Workload

    pb, pl = _grid("prefill_batches", prefill_batches), _grid("prefill_lengths", prefill_lengths)
    db, dc = _grid("decode_batches", decode_batches), _grid("decode_contexts", decode_contexts)
    if repeats < 1 or warmup < 0:
        raise SpecError("repeats", f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}",
                        "repeat every grid point at least once")
    t_wall = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, seed)
    steps = warmup + repeats
    # one request row per (grid point, slot); prompts come from the backend's synthetic ids
    prompts: list[int] = []
    outputs: list[int] = []
    pre_rows, dec_rows = {}, {}
    for b in pb:
        for length in pl:
            pre_rows[b, length] = list(range(len(prompts), len(prompts) + b))
            prompts += [length] * b
            outputs += [1] * b
    for b in db:
        for ctx in dc:
            dec_rows[b, ctx] = list(range(len(prompts), len(prompts) + b))
            prompts += [ctx] * b
            outputs += [steps] * b
    w = Workload.from_arrays(prompts, outputs, name="calibration-grid")
    need = int(max(p + o for p, o in zip(prompts, outputs)))
    placeholder = HardwareProfile("calibration", LatencyModel(1e-3, 1e-5, 1e-3, 1e-5, 1e-7),
                                  kv_capacity_tokens=max(need, 1), clients=1)
    # two replicas: the transfer grid moves caches between them
    backend = TorchBackend(Problem.single(w, placeholder, instances=2, kv_block_tokens=1), loaded, seed=seed,
                           clock=clock)

    def prefill_once(rows: list[int]) -> float:
        dt = backend.prefill(0, rows, sum(prompts[r] for r in rows))
        for r in rows:
            backend.release(0, r, False)
        return dt

    # warm-up: the largest prefill and a few decode steps
    big = pre_rows[max(pb), max(pl)]
    for _ in range(warmup):
        prefill_once(big)
    points: list[tuple[str, int, float, float]] = []
    for (b, length), rows in pre_rows.items():
        times = [prefill_once(rows) for _ in range(repeats)]
        points.append(("prefill", b, float(b * length), float(np.median(times))))
    for (b, ctx), rows in dec_rows.items():
        backend.prefill(0, rows, b * ctx)
        kv = b * ctx
        times, kvs = [], []
        for step in range(steps):
            dt = backend.decode(0, b, kv)
            if step >= warmup:
                times.append(dt)
                kvs.append(kv)
            kv += b
        for r in rows:
            backend.release(0, r, False)
        points.append(("decode", b, float(np.median(kvs)), float(np.median(times))))
    for length in pl:
        row = pre_rows[min(pb), length][0]
        backend.prefill(0, [row], length)
        times = [backend.migrate(i % 2, (i + 1) % 2, row, length) for i in range(steps)][warmup:]
        backend.release(steps % 2, row, False)
        points.append(("transfer", 1, float(length), float(np.median(times))))
    for length in pl:
        row = pre_rows[min(pb), length][0]
        backend.prefill(0, [row], length)
        # one copy: half of a swap-out and its swap-in (the two directions are priced alike)
        times = [(backend.swap_out(0, row, length) + backend.swap_in(0, row, length)) / 2 for _ in range(steps)]
        backend.release(0, row, False)
        points.append(("swap", 1, float(length), float(np.median(times[warmup:]))))
    pre = [p for p in points if p[0] == "prefill"]
    dec = [p for p in points if p[0] == "decode"]
    tra = [p for p in points if p[0] == "transfer"]
    swp = [p for p in points if p[0] == "swap"]
    a_p, b_p, r2_p = fit_prefill([p[2] for p in pre], [p[3] for p in pre])
    a_d, b_d, c_d, r2_d = fit_decode([p[1] for p in dec], [p[2] for p in dec], [p[3] for p in dec])
    # a transfer is linear in the tokens moved
    moved = np.array([p[2] for p in tra])
    (a_t, b_t), _ = _nnls_relative(np.column_stack([np.ones_like(moved), moved]), [p[3] for p in tra])
    # a swap too, through the origin (the latency model states a per-token swap cost only)
    (b_s,), _ = _nnls_relative(np.array([[p[2]] for p in swp]), [p[3] for p in swp])
    if a_d + b_d <= 0:
        # timer noise on a tiny model can put a decode's whole cost on the KV term, which would price
        # an empty cache at nothing: fit base + per request alone instead
        a_d, b_d, r2_d = fit_prefill([p[1] for p in dec], [p[3] for p in dec])
        c_d = 0.0
    if a_p + b_p <= 0 or a_d + b_d <= 0:  # pragma: no cover - only with absurd measurements
        raise SpecError("calibration", "the fit gives iterations that take no time", "use a larger grid")
    lat = LatencyModel(a_p, b_p, a_d, b_d, c_d, kv_transfer_base_s=float(a_t), kv_transfer_per_token_s=float(b_t),
                       kv_swap_per_token_s=float(b_s))
    predict = {"prefill": lambda b, tok: lat.prefill_time(tok), "decode": lat.decode_time,
               "transfer": lambda b, tok: lat.transfer_time(tok), "swap": lambda b, tok: lat.swap_time(tok)}
    out = [CalibrationPoint(k, b, tok, sec, predict[k](b, tok)) for k, b, tok, sec in points]
    return Calibration(latency=lat, points=out, r2_prefill=r2_p, r2_decode=r2_d, model=loaded.name,
                       device=loaded.device, dtype=str(loaded.dtype).removeprefix("torch."),
                       clock=clock, wall_s=time.perf_counter() - t_wall)


# -- serving engines -----------------------------------------------------------------------------
def _bucket(x: np.ndarray) -> np.ndarray:
    """Quarter-octave bucket of non-negative token counts (0 stays its own bucket)."""
    return np.where(x > 0, np.round(4 * np.log2(np.maximum(x, 1))).astype(np.int64) + 1, 0)


def fit_engine_steps(results, kv_capacity_tokens: int | None = None) -> Calibration:
    """Fit the five latency coefficients to the steps of engine runs (see the module docstring).

    Parameters
    ----------
    results
        :class:`~lloptim.runtime.engine.RunResult` objects of engine runs (their ``extra`` carries
        ``trace_decodes`` and ``trace_decode_kv_tokens``), on one engine configuration and clock.
    kv_capacity_tokens
        Unused by the fit; kept in the calibration's notes (``extra``).

    Returns
    -------
    Calibration
        One point per step shape (median time over its steps), the fit, R^2 of the prefill steps and
        of the decode and mixed steps, ``clock`` of the runs, and in ``extra`` the number of steps and
        the median ``|relative error|`` over all steps (``step_median_rel_error``).

    Raises
    ------
    SpecError
        No engine steps, runs without step details, or too few shapes to fit.
    """
    kinds, dur, tok, dec, kv, prefix = [], [], [], [], [], []
    clocks, dense = set(), set()
    for res in results:
        st = engine_steps(res)
        kinds.append(st["kind"])
        dur.append(st["duration_s"])
        tok.append(st["prompt_tokens"])
        dec.append(st["decodes"])
        kv.append(st["kv_tokens"])
        prefix.append(st["prefix_tokens"])
        clocks.add(res.extra.get("clock", "wall"))
        dense.add(bool(res.extra.get("dense_attention", False)))
    if not kinds or sum(len(k) for k in kinds) == 0:
        raise SpecError("results", "no engine steps to fit", "serve some requests first")
    if len(dense) > 1:
        raise SpecError("results", "runs of engines with and without dense batch attention",
                        "calibrate one engine configuration at a time")
    return fit_steps(np.concatenate(kinds), np.concatenate(dur), np.concatenate(tok), np.concatenate(dec),
                     np.concatenate(kv), clock=clocks.pop() if len(clocks) == 1 else "mixed",
                     kv_capacity_tokens=kv_capacity_tokens, prefix_tokens=np.concatenate(prefix),
                     dense_attention=dense.pop())


def price_steps(latency: LatencyModel, kind, prompt_tokens, decodes, kv_tokens, prefix_tokens=None) -> np.ndarray:
    """Each served step's time under ``latency``, priced as the simulator prices it.

    Parameters
    ----------
    latency
        The latency model (e.g. a calibration's).
    kind, prompt_tokens, decodes, kv_tokens, prefix_tokens
        One entry per step, as for :func:`fit_steps`.

    Returns
    -------
    numpy.ndarray
        Seconds per step: a prefill (or a mixed step without decodes) ``prefill_base_s +
        prefill_per_token_s * prompt``; otherwise the decode plus ``prefill_per_token_s * prompt``;
        both plus the dense batch attention (0 unless the model has it).
    """
    kind = np.asarray(kind, dtype=np.int64)
    tok = np.asarray(prompt_tokens, dtype=np.float64)
    dec = np.asarray(decodes, dtype=np.float64)
    kv = np.asarray(kv_tokens, dtype=np.float64)
    prefix = np.zeros_like(kv) if prefix_tokens is None else np.asarray(prefix_tokens, dtype=np.float64)
    lat = latency
    prefill = lat.prefill_base_s + lat.prefill_per_token_s * tok
    decode = lat.decode_base_s + lat.decode_per_seq_s * dec + lat.decode_per_kv_token_s * kv + lat.prefill_per_token_s * tok
    prefill_like = (kind == 0) | (dec == 0)
    return np.where(prefill_like, prefill, decode) + lat.dense_attention_time(dec + tok, kv + prefix)


def engine_steps(result) -> dict[str, np.ndarray]:
    """The served steps of an engine run, as :func:`fit_steps` and :func:`price_steps` take them.

    Parameters
    ----------
    result
        A :class:`~lloptim.runtime.engine.RunResult` of :func:`~lloptim.engines.serve.serve_engine`.

    Returns
    -------
    dict
        ``kind``, ``duration_s``, ``prompt_tokens``, ``decodes``, ``kv_tokens``, ``prefix_tokens``:
        one entry per step.

    Raises
    ------
    SpecError
        A run without engine step details (a simulated run).
    """
    extra = result.extra or {}
    if "trace_decodes" not in extra or "trace_decode_kv_tokens" not in extra:
        raise SpecError("results", "a run without engine step details (trace_decodes, trace_decode_kv_tokens)",
                        "calibrate from runs of lloptim.engines")
    n = len(result.trace_kind)
    return {"kind": result.trace_kind, "duration_s": result.trace_duration_s,
            "prompt_tokens": result.trace_prefill_tokens, "decodes": extra["trace_decodes"],
            "kv_tokens": extra["trace_decode_kv_tokens"],
            "prefix_tokens": extra.get("trace_chunk_prefix_tokens", np.zeros(n, dtype=np.int64))}


def fit_steps(kind, duration_s, prompt_tokens, decodes, kv_tokens, clock: str = "wall",
              kv_capacity_tokens: int | None = None, prefix_tokens=None, dense_attention: bool = False) -> Calibration:
    """Fit the five latency coefficients to served steps, one entry per step (see the module docstring).

    Parameters
    ----------
    kind
        Kind of each step: 0 prefill, 1 decode, 2 mixed (a mixed step without decodes counts as a
        prefill of prompt chunks).
    duration_s
        Measured time of each step, seconds (steps of no time are left out).
    prompt_tokens
        Prompt tokens each step processed, tokens.
    decodes
        Requests each step decoded (count).
    kv_tokens
        KV tokens the decoding requests held before each step, tokens.
    clock
        The clock the times were read on, for the record.
    kv_capacity_tokens
        Unused by the fit; kept in the calibration's notes (``extra``).
    prefix_tokens
        Prompt tokens each step's chunks had prefilled before it, tokens (``None``: 0).
    dense_attention
        Also fit :attr:`~lloptim.hardware.LatencyModel.dense_attention_per_pair_s`, the cost of an
        attention computed as one dense matrix over the batch (``Q * (Q + K)`` pairs, ``Q`` the step's
        query tokens, ``K`` the cached tokens it reads): transformers' paged ``sdpa`` path.

    Returns
    -------
    Calibration
        As :func:`fit_engine_steps`.

    Raises
    ------
    SpecError
        No steps, or too few step shapes to pin five coefficients.
    """
    kind = np.asarray(kind, dtype=np.int64)
    if kind.size == 0:
        raise SpecError("results", "no engine steps to fit", "serve some requests first")
    dur = np.asarray(duration_s, dtype=np.float64)
    tok = np.asarray(prompt_tokens, dtype=np.float64)
    dec = np.asarray(decodes, dtype=np.float64)
    kv = np.asarray(kv_tokens, dtype=np.float64)
    prefix = np.zeros_like(kv) if prefix_tokens is None else np.asarray(prefix_tokens, dtype=np.float64)
    # a "mixed" step without decodes is a prefill of prompt chunks
    kind = np.where((kind == 2) & (dec == 0), 0, kind)
    ok = dur > 0
    kind, dur, tok, dec, kv, prefix = kind[ok], dur[ok], tok[ok], dec[ok], kv[ok], prefix[ok]
    # (query, key) pairs of a dense batch attention: every query token against every key read
    pairs = (dec + tok) * (dec + tok + kv + prefix)
    key = np.stack([kind, dec.astype(np.int64), _bucket(tok), _bucket(kv)], axis=1)
    _, group, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    group = group.ravel()
    n_groups = counts.size
    med = np.array([np.median(dur[group == g]) for g in range(n_groups)])
    g_kind = np.array([kind[group == g][0] for g in range(n_groups)])
    g_dec = np.array([dec[group == g][0] for g in range(n_groups)])
    g_tok = np.array([np.median(tok[group == g]) for g in range(n_groups)])
    g_kv = np.array([np.median(kv[group == g]) for g in range(n_groups)])
    g_pairs = np.array([np.median(pairs[group == g]) for g in range(n_groups)])
    pre = g_kind == 0
    a = np.zeros((n_groups, 6 if dense_attention else 5))
    a[pre, 0] = 1.0
    a[:, 1] = g_tok
    a[~pre, 2] = 1.0
    a[~pre, 3] = g_dec[~pre]
    a[~pre, 4] = g_kv[~pre]
    if dense_attention:
        a[:, 5] = g_pairs
    if n_groups < a.shape[1] or not pre.any() or pre.all():
        raise SpecError("results", f"{n_groups} step shapes ({int(pre.sum())} prefill) cannot pin {a.shape[1]} "
                        "coefficients",
                        "calibrate on a longer workload, under policies with separate prefill steps")
    from scipy.optimize import nnls

    w = np.sqrt(counts) / med
    x, _ = nnls(a * w[:, None], med * w)
    lat = LatencyModel(*[float(v) for v in x[:5]], dense_attention_per_pair_s=float(x[5]) if dense_attention else 0.0)
    pred = a @ x

    def r2(sel: np.ndarray) -> float:
        y = med[sel]
        ss = float(np.sum((y - y.mean()) ** 2)) if y.size else 0.0
        return 1.0 - float(np.sum((y - pred[sel]) ** 2)) / ss if ss > 0 else 1.0

    # every single step against the fit: what a prediction built on it can hope for
    step_pred = price_steps(lat, kind, tok, dec, kv, prefix)
    step_err = np.abs(step_pred - dur) / dur
    names = {0: "prefill", 1: "decode", 2: "mixed"}
    points = [CalibrationPoint(names[int(g_kind[g])], int(g_dec[g]) if g_kind[g] else 0,
                               float(g_tok[g] if g_kind[g] != 1 else g_kv[g]), float(med[g]), float(pred[g]),
                               float(g_kv[g]) if g_kind[g] == 2 else 0.0, int(counts[g]))
              for g in np.lexsort((g_tok, g_dec, g_kind))]
    return Calibration(latency=lat, points=points, r2_prefill=r2(pre), r2_decode=r2(~pre),
                       clock=clock,
                       extra={"steps": int(dur.size), "step_median_rel_error": float(np.median(step_err)),
                              "kv_capacity_tokens": kv_capacity_tokens})


def calibration_workload(requests: int = 48, seed: int = 0):
    """GSM8K *train* requests (true token counts) to calibrate an engine on, disjoint from any test run.

    Parameters
    ----------
    requests
        How many (a seeded sample of the train split).
    seed
        Seed of the sample.

    Returns
    -------
    Workload
        All arriving at time 0.
    """
    from lloptim.workloads import gsm8k

    train = gsm8k("train")
    rows = np.sort(np.random.default_rng(seed).choice(len(train), size=min(requests, len(train)), replace=False))
    return train.subset(rows)


def _calibration_problems(workload, clients: int, instances: int, kv_capacity_tokens: int, seed: int):
    """The calibration problem (``workload``, default :func:`calibration_workload`) and its warm-up part.

    The instances carry a placeholder profile: a calibration serves for real and never predicts.
    """
    from lloptim.problem import Problem

    # enough requests for batches as large as the served ones: three waves of every client
    w = workload if workload is not None else calibration_workload(max(48, 3 * clients * instances), seed=seed)
    placeholder = HardwareProfile("engine-calibration", LatencyModel(1e-3, 1e-5, 1e-3, 1e-5, 1e-7),
                                  kv_capacity_tokens=kv_capacity_tokens, clients=clients)
    problem = Problem.single(w, placeholder, clients=clients, instances=instances)
    few = Problem.single(w.subset(np.arange(min(len(w), 2 * clients * instances))), placeholder,
                         clients=clients, instances=instances)
    return problem, few


def calibrate_engine(engines, workload=None, policies=CALIBRATION_POLICIES, clock: str = "wall",
                     seed: int = 0, warmup: bool = True) -> tuple[Calibration, list]:
    """Serve a calibration workload on started engines and fit their step timings.

    Parameters
    ----------
    engines
        Started engines (:class:`~lloptim.engines.vllm.VllmEngine`, :class:`~lloptim.engines.hf.HFEngine`),
        one per instance; the fit pools all their steps.
    workload
        What to serve; default :func:`calibration_workload` of ``max(48, 3 * clients * len(engines))``
        requests (batches as large as the engines run).
    policies
        Policies to serve it under (see :data:`CALIBRATION_POLICIES`).
    clock
        ``"wall"`` or ``"cpu"`` seconds per step.
    seed
        Seed of the policies.
    warmup
        First serve a few requests unrecorded: an engine's first steps of each shape are slower
        (kernel selection, allocator growth), which would inflate the fit.

    Returns
    -------
    tuple
        The :class:`Calibration` (``model`` and ``device`` name the engine) and the runs behind it.
    """
    from lloptim.engines.serve import serve_engine

    t_wall = time.perf_counter()
    e0 = engines[0]
    cap = e0.kv_layout.capacity_tokens
    problem, few = _calibration_problems(workload, e0.clients, len(engines), cap, seed)
    if warmup:
        for p in dict.fromkeys(("engine-default",) + tuple(policies)):
            serve_engine(few, p, engines, clock=clock, seed=seed)
    runs = [serve_engine(problem, p, engines, clock=clock, seed=seed) for p in policies]
    cal = fit_engine_steps(runs, kv_capacity_tokens=cap)
    cal.model = str(getattr(e0, "model_dir", "") or "")
    cal.device = e0.name
    cal.dtype = str(getattr(e0, "dtype", ""))
    cal.wall_s = time.perf_counter() - t_wall
    return cal, runs


#: Policies a serving calibration of the torch backend runs its workload under: the baseline's
#: prefills of one to a few prompts, the hybrid's batched prefills, Sarathi's mixed steps.
SERVING_CALIBRATION_POLICIES = ("baseline", "hybrid", "sarathi")


def calibrate_serving(model="tiny-llama", device: str = "auto", dtype: str | None = None, seed: int = 0,
                      clients: int = DEFAULT_CLIENTS, workload=None, policies=SERVING_CALIBRATION_POLICIES,
                      clock: str = "wall", warmup: bool = True,
                      kv_capacity_tokens: int = 1 << 22) -> tuple[Calibration, list]:
    """Serve a calibration workload on lloptim's torch backend and fit its own step timings.

    The torch backend's counterpart of :func:`calibrate_engine` (same workload, same fit,
    :func:`fit_steps`): the steps are the ones a real run executes, batches of many shapes and
    mixed steps included, so the profile predicts runs far better than the grid of :func:`calibrate`,
    which times isolated prefills and decodes of uniform requests.

    Parameters
    ----------
    model
        Model name, directory or :class:`~lloptim.backends.models.LoadedModel`.
    device, dtype, seed
        As for :func:`~lloptim.backends.models.load_model` (``seed`` also seeds the policies and
        the default workload's sample).
    clients
        Clients (concurrent requests) of the one instance served.
    workload
        What to serve; default :func:`calibration_workload` (GSM8K *train* requests).
    policies
        Policies to serve it under (see :data:`SERVING_CALIBRATION_POLICIES`).
    clock
        ``"wall"`` or ``"cpu"`` seconds per step (as for the backend).
    warmup
        First serve a few requests unrecorded (first steps of a shape are slower).
    kv_capacity_tokens
        KV capacity of the served instance, tokens (the backend allocates per request, so it only
        bounds the admissions).

    Returns
    -------
    tuple
        The :class:`Calibration` and the :class:`~lloptim.runtime.engine.RunResult` of each policy.

    Raises
    ------
    SpecError
        Bad model, device or clock, or too few step shapes to fit.
    """
    from lloptim.backends.models import LoadedModel, load_model
    from lloptim.backends.torch_backend import TorchBackend
    from lloptim.simulator import run_policy

    t_wall = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, seed)
    problem, few = _calibration_problems(workload, clients, 1, kv_capacity_tokens, seed)
    if warmup:
        for p in policies:
            run_policy(few, p, backend=TorchBackend(few, loaded, clock=clock), seed=seed)
    runs, steps = [], []
    for p in policies:
        backend = TorchBackend(problem, loaded, clock=clock)
        runs.append(run_policy(problem, p, backend=backend, seed=seed))
        steps.extend(backend.steps)
    cols = list(zip(*steps)) if steps else [()] * 5
    cal = fit_steps(*cols, clock=clock, kv_capacity_tokens=kv_capacity_tokens)
    cal.model, cal.device = loaded.name, loaded.device
    cal.dtype = str(loaded.dtype).removeprefix("torch.")
    cal.wall_s = time.perf_counter() - t_wall
    return cal, runs
