"""``lloptim simulate``: run one policy in the discrete-event simulator."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from lloptim.cli.app import app
from lloptim.cli.common import (NO_SIZE_GUARD, SIZE_GUARD_HELP, console, load_problem, output_path, print_json,
                                user_errors, warn, write_reporting)
from lloptim.cli.tables import Column, print_table

#: Columns of :func:`print_metrics`: header and key of :meth:`~lloptim.metrics.RunMetrics.to_dict`.
METRIC_COLUMNS = [("policy", "policy"), ("makespan s", "makespan_s"), ("utilization", "utilization"),
                  ("lower bound s", "lower_bound_s"), ("gap to bound", "gap_to_bound"),
                  ("tokens/s", "throughput_tokens_per_s"), ("p99 latency s", "latency_p99_s"),
                  ("decision p99 us", "decision_latency_us_p99")]

#: API fields of a simulation and the flags of ``lloptim simulate`` that set them.
SIMULATE_FLAGS = {"policy": "--policy", "faults": "--fault", "kv_mode": "--kv-mode",
                  "kv_block_tokens": "--kv-block", "victim": "--victim", "estimates": "--estimator",
                  "train": "--train", "preemption": "--preemption", "swap_space_tokens": "--swap-space",
                  "policy_option": "--policy-option"}


def _cell(key: str, v) -> str:
    if key == "policy":
        return str(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key in ("utilization", "gap_to_bound"):
        return f"{100 * v:.2f} %"
    return f"{v:,.2f}"


def print_metrics(rows: list[dict], title: str) -> None:
    """Print run metrics, one row per policy, within the terminal's width (no number cut)."""
    print_table(console, title, [Column(h, numeric=k != "policy") for h, k in METRIC_COLUMNS],
                [[_cell(k, row.get(k)) for _, k in METRIC_COLUMNS] for row in rows])


def estimator_summary(estimator: str, train, ratio: float, rank: float) -> str:
    """One line on the estimates a run's policy saw: where they came from and how good they were.

    ``train`` is the training workload of a fitted estimator (None for ``noisy``); ``ratio`` and
    ``rank`` are :attr:`~lloptim.metrics.RunMetrics.estimate_ratio_median` and
    :attr:`~lloptim.metrics.RunMetrics.estimate_rank_correlation` (the simulator knows the truth,
    the policy did not).
    """
    source = f"trained on {train.name}, {len(train):,} requests" if train is not None else "the truth x exp(N(0, 0.5))"
    rank_text = "-" if math.isnan(rank) else f"{rank:.2f}"
    return (f"estimates: {estimator} ({source}); median estimate / true length {ratio:.2f}, "
            f"rank correlation with the true lengths {rank_text}")


def estimator_advice(ratio: float, rank: float, fitted: bool) -> str | None:
    """A warning when the estimates carry little information or are biased, else None.

    Barely informative: rank correlation below
    :data:`~lloptim.runtime.estimators.INFORMATIVE_RANK_CORRELATION` (or none, all estimates
    equal): policies that order by estimates order almost at random. Biased: median ratio off by
    more than :data:`~lloptim.runtime.estimators.BIASED_RATIO` either way.
    """
    from lloptim.runtime.estimators import BIASED_RATIO, INFORMATIVE_RANK_CORRELATION

    problems = []
    if math.isnan(rank) or rank < INFORMATIVE_RANK_CORRELATION:
        problems.append("barely informative" if not math.isnan(rank) else "all equal")
    if ratio > BIASED_RATIO or ratio < 1.0 / BIASED_RATIO:
        problems.append(f"{'too long' if ratio > 1 else 'too short'} (median {ratio:.2f}x the truth)")
    if not problems:
        return None
    fix = ("--train SPEC trains it on requests like these; where prompts say little about output lengths, "
           "no prompt-based estimator can do better" if fitted else "the noise of 'noisy' is fixed")
    return (f"the output-length estimates are {' and '.join(problems)} for this workload; length-aware "
            f"policies then schedule on little information ({fix})")


def parse_policy_options(texts: list[str]) -> dict:
    """``["KEY=VALUE", ...]`` -> keyword options of the policy's factory (errors name ``--policy-option``).

    A value is read as a TOML value where it is one (``4``, ``0.5``, ``true``, ``"known"``), else
    kept as the text (``fleet_homes=known``); the policy's factory checks names and values.
    """
    import tomllib

    from lloptim.errors import SpecError

    options: dict = {}
    for text in texts:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SpecError("--policy-option", f"cannot read {text!r}",
                            "write KEY=VALUE with the name of an option of the policy's factory, e.g. "
                            "order_candidates=4 (see the docs of the policy, e.g. hybrid_policy)")
        if key in options:
            raise SpecError("--policy-option", f"{key!r} given twice", "give each option once")
        try:
            options[key] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = value.strip()
    return options


def policy_option_option():
    """The ``--policy-option`` / ``-o`` option of ``lloptim simulate`` and ``lloptim run``."""
    return typer.Option([], "--policy-option", "-o", metavar="<k=v>",
                        help="KEY=VALUE option of the policy's factory, e.g. order_candidates=4 for the hybrid; "
                             "repeatable")


def checked_policy_options(policy: str, texts: list[str]) -> dict:
    """The options of ``--policy-option``, checked against ``policy``'s factory before any work.

    Raises
    ------
    SpecError
        Named ``--policy-option``: a malformed or repeated option, one the factory does not take,
        or a value it refuses (the option's own field in the message).
    """
    from lloptim.errors import SpecError
    from lloptim.runtime.registry import make_policy

    options = parse_policy_options(texts)
    if options:
        try:
            make_policy(policy, **options)
        except SpecError as exc:
            raise SpecError("--policy-option", f"{exc.field}: {exc.problem}", exc.fix) from None
    return options


def parse_fault(text: str):
    """``"TIME:INSTANCE[:CLIENT]"`` -> :class:`~lloptim.runtime.engine.Fault` (errors name ``--fault``)."""
    from lloptim.errors import SpecError
    from lloptim.runtime.engine import Fault

    parts = text.split(":")
    fix = "write TIME:INSTANCE or TIME:INSTANCE:CLIENT (seconds >= 0, an instance index, a global client index), " \
          "e.g. 30:0:5"
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        time_s, instance = float(parts[0]), int(parts[1])
        client = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise SpecError("--fault", f"cannot read {text!r}", fix) from None
    try:
        return Fault(time_s, instance, client)
    except SpecError as exc:
        raise SpecError("--fault", f"{text!r}: {exc.field.removeprefix('faults.')} {exc.problem}", fix) from None


def check_faults(faults, problem) -> None:
    """Refuse faults that name an instance or client ``problem`` does not have (before the run)."""
    from lloptim.errors import SpecError

    ci = problem.client_instance() if any(f.client is not None for f in faults) else None
    for f in faults:
        if f.instance >= len(problem.instances):
            raise SpecError("--fault", f"instance {f.instance} does not exist: the problem has "
                            f"{len(problem.instances)}", f"use an instance index in 0..{len(problem.instances) - 1}")
        if f.client is not None and (f.client >= problem.n_clients or ci[f.client] != f.instance):
            first = int(sum(i.clients for i in problem.instances[:f.instance]))
            raise SpecError("--fault", f"client {f.client} is not on instance {f.instance}",
                            f"give a global client index of that instance, {first}.."
                            f"{first + problem.instances[f.instance].clients - 1}")


def migrate_warning(problem, flag: str = "--migrate") -> None:
    """Warn that migration does nothing on one instance (it moves running requests *between* instances)."""
    if len(problem.instances) == 1:
        warn(f"{flag} does nothing here: the problem has one instance, and migration moves running requests "
             "between instances (add instances, e.g. count = 2 in [[instances]], or drop the flag)")


def preemption_option():
    """The ``--preemption`` option of ``lloptim simulate`` and ``lloptim run``."""
    return typer.Option("recompute", "--preemption",
                        help="what a preemption does: recompute (drop the cache, prefill it again; vLLM's default) "
                             "or swap (copy it to host memory and back, priced in the simulator by the profile's "
                             "kv_swap_per_token_s; recompute when the host space is full)")


def swap_space_option():
    """The ``--swap-space`` option of ``lloptim simulate`` and ``lloptim run``."""
    return typer.Option(None, "--swap-space", help="host swap space of each instance, KV tokens (with --preemption "
                                                   "swap; default: the size of its KV cache)")


def check_kv_options(kv_mode: str | None, kv_block_tokens: int | None, victim: str = "newest",
                     preemption: str = "recompute", swap_space: int | None = None) -> None:
    """Validate the KV flags before any work, naming the flag in the error."""
    from lloptim.errors import SpecError
    from lloptim.memory import check_block_tokens, check_kv_mode
    from lloptim.runtime.kv import VICTIM_RULES

    if kv_mode is not None:
        check_kv_mode(kv_mode, "--kv-mode")
    if kv_block_tokens is not None:
        check_block_tokens(kv_block_tokens, field="--kv-block")
    if victim not in VICTIM_RULES:
        raise SpecError("--victim", f"unknown preemption victim rule {victim!r}", f"use one of {list(VICTIM_RULES)}")
    check_preemption_options(preemption, swap_space)


def check_preemption_options(preemption: str, swap_space: int | None) -> None:
    """Validate ``--preemption`` and ``--swap-space`` before any work, naming the flag in the error."""
    from lloptim.errors import SpecError
    from lloptim.runtime.kv import PREEMPTION_MODES
    from lloptim.validation import check_int

    if preemption not in PREEMPTION_MODES:
        raise SpecError("--preemption", f"unknown preemption mode {preemption!r}", f"use one of {list(PREEMPTION_MODES)}")
    if swap_space is not None:
        check_int("--swap-space", swap_space, lo=0, fix="give the host swap space of each instance in KV tokens, >= 0")
        if preemption != "swap":
            raise SpecError("--swap-space", "is only read with --preemption swap", "add --preemption swap or drop "
                            "--swap-space")


@app.command()
def simulate(
    spec: Optional[Path] = typer.Argument(None, help="TOML spec; default: GSM8K test on llama-65b"),
    policy: str = typer.Option("baseline", "--policy", "-p", help="policy name (see `lloptim policies`)"),
    policy_option: list[str] = policy_option_option(),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    fault: list[str] = typer.Option([], "--fault",
                                    help="inject a failure TIME:INSTANCE[:CLIENT] (seconds; global client index); repeatable"),
    migrate: bool = typer.Option(False, "--migrate",
                                 help="let idle instances take over running requests with their KV caches in the "
                                      "end game (costed by the profiles' kv_transfer_*; several instances only)"),
    trace: Optional[Path] = typer.Option(None, "--trace",
                                         help="write one CSV row per request: id, instance, client, arrival_s, "
                                              "ready_s, start_s, finish_s"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="draw the per-client timeline (and the critical path "
                                                              "of a workflow) to this image file"),
    estimator: str = typer.Option("oracle", "--estimator",
                                  help="output lengths the policy sees: oracle (the truth), mean, regression, "
                                       "bucket-quantile (fitted on --train), or noisy (the truth x exp(N(0, 0.5)))"),
    train: Optional[Path] = typer.Option(None, "--train",
                                         help="TOML spec whose workload trains the estimator; default: the rest of "
                                              "the trace for an Azure trace, else GSM8K train"),
    size_guard: bool = typer.Option(True, f"--size-guard/{NO_SIZE_GUARD}", help=SIZE_GUARD_HELP),
    kv_mode: Optional[str] = typer.Option(None, "--kv-mode",
                                          help="KV memory of every instance: paged (blocks on demand, preemption; "
                                               "vLLM) or reserve (prompt + cap or estimate); default: the spec's"),
    kv_block_tokens: Optional[int] = typer.Option(None, "--kv-block",
                                                  help="tokens per KV block (default: the spec's, 16)"),
    victim: str = typer.Option("newest", "--victim",
                               help="which running request a preemption takes: newest (vLLM), fewest-tokens, "
                                    "longest-remaining"),
    preemption: str = preemption_option(),
    swap_space: Optional[int] = swap_space_option(),
) -> None:
    """Simulate SPEC under one policy and report makespan, utilization and the lower bound."""
    from lloptim.errors import SpecError
    from lloptim.metrics import summarize
    from lloptim.runtime.migration import with_migration
    from lloptim.runtime.estimators import ESTIMATOR_NAMES, estimate, training_workload
    from lloptim.runtime.registry import make_policy, policy_names
    from lloptim.simulator import run_policy
    from lloptim.trace import write_trace_csv
    from lloptim.validation import check_choice

    with user_errors(SIMULATE_FLAGS, size_guard):
        check_choice("--policy", policy, sorted(policy_names()), "policy")
        options = checked_policy_options(policy, policy_option)
        chosen = make_policy(policy, **options)
        check_kv_options(kv_mode, kv_block_tokens, victim, preemption, swap_space)
        check_choice("--estimator", estimator, ESTIMATOR_NAMES, "estimator")
        if train is not None and estimator in ("oracle", "noisy"):
            raise SpecError("--train", f"the {estimator} estimator learns nothing",
                            "drop --train or pick a fitted estimator (mean, regression, bucket-quantile)")
        faults = [parse_fault(f) for f in fault]
        trace_path = output_path("--trace", trace, (".csv",))
        plot_path = None
        if plot is not None:
            from lloptim.plots import check_figure_path

            plot_path = check_figure_path(plot, "--plot")
        train_problem = load_problem(train) if train is not None else None
        problem = load_problem(spec)
        check_faults(faults, problem)
        if migrate:
            migrate_warning(problem)
        estimates = None
        data = None
        if estimator != "oracle":
            if estimator != "noisy":
                data = train_problem.workload if train_problem is not None else training_workload(problem.workload)
            estimates = estimate(problem.workload, estimator, data, sigma=0.5)
        result = run_policy(problem, with_migration(chosen) if migrate else chosen, estimates=estimates,
                            faults=faults, progress=not json_out, kv_mode=kv_mode, kv_block_tokens=kv_block_tokens,
                            victim=victim, preemption=preemption, swap_space_tokens=swap_space)
        metrics = summarize(result)
    # the files after the work, the results whatever happens to them (a full disk costs only the file)
    failed = None
    if trace_path is not None:
        _, failed = write_reporting("--trace", trace_path, lambda p: write_trace_csv(result, p))
    if plot_path is not None and failed is None:
        from lloptim.plots import plot_run

        _, failed = write_reporting("--plot", plot_path, lambda p: plot_run(result, p))
    d = metrics.to_dict()
    d["estimator"] = estimator
    if data is not None:
        d["estimator_train"] = {"name": data.name, "requests": len(data)}
    if options:
        d["policy_options"] = options
    if json_out:
        print_json(d)
    else:
        print_metrics([d], f"{problem.name}: {problem.n_requests} requests, {problem.n_clients} clients")
        if estimates is not None:
            console.print(estimator_summary(estimator, data, d["estimate_ratio_median"],
                                            d["estimate_rank_correlation"]))
    if estimates is not None:
        advice = estimator_advice(d["estimate_ratio_median"], d["estimate_rank_correlation"], data is not None)
        if advice:
            warn(advice)
    if failed is not None:
        raise failed


@app.command()
def policies(json_out: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """List the named policies."""
    from rich.markup import escape

    from lloptim.runtime.registry import policy_names

    names = policy_names()
    if json_out:
        print_json({"policies": [{"name": n, "description": d} for n, d in names.items()]})
        return
    for name, desc in names.items():
        console.print(f"[bold]{escape(name)}[/]: {escape(desc)}")
