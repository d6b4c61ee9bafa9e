"""Figures: per-client timelines, the case-study utilization distribution, noise degradation.

Matplotlib with the non-interactive Agg backend: :func:`plot_timeline` draws on the axes it is
given (with the critical path of a workflow run outlined), :func:`plot_run` and
:func:`plot_reproduction` write a figure file and return its path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lloptim.experiments import unknown_lengths_key  # noqa: E402
from lloptim.runtime.engine import KIND_MIXED, RunResult  # noqa: E402

__all__ = ["plot_timeline", "plot_latency", "plot_run", "plot_latency_comparison", "plot_reproduction",
           "check_figure_path"]

COLORS = {"prefill": "#e8a33d", "decode": "#3b75af", "waiting": "#d9d9d9"}
#: Colour of the critical path's outline and hand-off arrows.
CRITICAL = "#c0392b"


def plot_timeline(ax, result: RunResult, title: str, max_clients: int | None = None) -> None:
    """Per-client bars: waiting for a prefill (grey), in its prefill (orange), decoding (blue); white is idle.

    Stalls of a decoding client during other clients' prefills are part of the blue bar here; the
    utilization figure in the title counts them as bubbles.

    Parameters
    ----------
    ax
        Matplotlib axes to draw on; the x axis is time, seconds.
    result
        The run to draw.
    title
        Prefix of the axes title (makespan in seconds and utilization in % follow it).
    max_clients
        Draw only the first ``max_clients`` global clients (count); None: all.
    """
    n_clients = result.problem.n_clients if max_clients is None else min(max_clients, result.problem.n_clients)
    ok = result.client >= 0
    for c in range(n_clients):
        rows = np.flatnonzero(ok & (result.client == c))
        a, s, e, d = (result.assign_s[rows], result.prefill_start_s[rows], result.prefill_end_s[rows],
                      result.done_s[rows])
        ax.broken_barh(list(zip(a, s - a)), (c - 0.4, 0.8), color=COLORS["waiting"], linewidth=0)
        ax.broken_barh(list(zip(s, e - s)), (c - 0.4, 0.8), color=COLORS["prefill"], linewidth=0)
        ax.broken_barh(list(zip(e, d - e)), (c - 0.4, 0.8), color=COLORS["decode"], linewidth=0)
    busy = float(np.dot(result.trace_duration_s, result.trace_participants))
    util = busy / (result.problem.n_clients * result.makespan_s)
    note = ""
    if result.problem.workload.precedence is not None:
        from lloptim.bounds import critical_path_bound

        bound, path = critical_path_bound(result.problem, fused=bool(np.any(result.trace_kind == KIND_MIXED)))
        _draw_critical_path(ax, result, path, n_clients)
        note = f"; critical path (red) {bound:.2f} s at the least"
    ax.set_title(f"{title}: makespan {result.makespan_s:.2f} s, utilization {100 * util:.1f} %{note}")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("client")
    ax.set_xlim(0, result.makespan_s * 1.01)
    ax.set_ylim(-1, n_clients)


def _draw_critical_path(ax, result: RunResult, path: list[int], n_clients: int) -> None:
    """Outline where the requests of the critical path ran (assignment to finish) and draw their hand-offs."""
    prev = None
    for r in path:
        c = int(result.client[r])
        start, end = result.assign_s[r], result.done_s[r]
        if 0 <= c < n_clients:
            ax.broken_barh([(start, end - start)], (c - 0.45, 0.9), facecolors="none", edgecolors=CRITICAL,
                           linewidth=1.5)
        if prev is not None:
            pc = int(result.client[prev])
            if 0 <= c < n_clients and 0 <= pc < n_clients:
                ax.annotate("", xy=(start, c), xytext=(result.done_s[prev], pc),
                            arrowprops={"arrowstyle": "->", "color": CRITICAL, "lw": 1.2})
        prev = r


def check_figure_path(path: str | Path, flag: str = "--plot") -> Path:
    """Check, before any work, that a figure can be written at ``path`` in a format matplotlib knows.

    Parameters
    ----------
    path
        Image file to write; its suffix names the format (``.png``, ``.svg``, ``.pdf`` ...).
    flag
        Option it came from, for the message.

    Raises
    ------
    SpecError
        The folder is missing or not writable, or the suffix names no format matplotlib writes.
    """
    from lloptim.validation import check_output_path

    fig = plt.figure()
    formats = fig.canvas.get_supported_filetypes()
    plt.close(fig)
    return check_output_path(flag, path, sorted("." + f for f in formats))


def plot_latency(ax, results, title: str = "latency") -> None:
    """Cumulative distributions of end-to-end latency (solid) and time to first token (dashed).

    One pair of curves per run, with the 99th percentile of the end-to-end latency marked; times
    from each request's arrival, seconds (:mod:`lloptim.metrics`).

    Parameters
    ----------
    ax
        Matplotlib axes to draw on; the x axis is seconds.
    results
        A :class:`~lloptim.runtime.engine.RunResult`, or a mapping of labels to them.
    title
        Axes title.
    """
    from lloptim.metrics import first_token_times

    runs = {results.policy: results} if isinstance(results, RunResult) else dict(results)
    for i, (label, res) in enumerate(runs.items()):
        arrival = res.problem.workload.arrival_s
        e2e = np.sort((res.done_s - arrival)[~np.isnan(res.done_s)])
        ttft = first_token_times(res) - arrival
        ttft = np.sort(ttft[~np.isnan(ttft)])
        color = f"C{i}"
        if e2e.size:
            ax.step(e2e, np.arange(1, e2e.size + 1) / e2e.size, where="post", color=color, label=f"{label} latency")
            p99 = float(np.percentile(e2e, 99))
            ax.axvline(p99, color=color, ls=":", lw=0.8)
            ax.annotate(f"p99 {p99:.1f} s", (p99, 0.99), color=color, fontsize="x-small", rotation=90,
                        ha="right", va="top")
        if ttft.size:
            ax.step(ttft, np.arange(1, ttft.size + 1) / ttft.size, where="post", color=color, ls="--",
                    label=f"{label} first token")
    ax.set_xlabel("seconds from arrival")
    ax.set_ylabel("share of requests")
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="lower right")


def plot_run(result: RunResult, path: str | Path, title: str | None = None, max_clients: int | None = 64) -> Path:
    """The per-client timeline of one run (:func:`plot_timeline`) written to ``path``.

    When the requests arrive over time, a second panel draws the latency and time-to-first-token
    distributions (:func:`plot_latency`).

    Parameters
    ----------
    result
        The run.
    path
        Image file to write (format from the suffix).
    title
        Title prefix; default: the policy's name.
    max_clients
        Draw at most this many clients (count); None: all.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    n = result.problem.n_clients if max_clients is None else min(max_clients, result.problem.n_clients)
    arrivals = result.problem.workload.arrival_s
    online = bool(arrivals.size and arrivals.max() > arrivals.min())
    height = 2.0 + 0.12 * n
    if online:
        fig, (ax, ax_lat) = plt.subplots(2, 1, figsize=(12, height + 3.5), constrained_layout=True,
                                         gridspec_kw={"height_ratios": [height, 3.5]})
    else:
        fig, ax = plt.subplots(figsize=(12, height), constrained_layout=True)
    plot_timeline(ax, result, title or result.policy, max_clients)
    if online:
        plot_latency(ax_lat, result, "latency from arrival")
    fig.legend(handles=[matplotlib.patches.Patch(color=v, label=k) for k, v in COLORS.items()],
               loc="outside lower center", ncols=3)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_comparison(results, path: str | Path, title: str = "") -> Path:
    """Latency of several runs of one problem: distributions, and each request's latency by arrival.

    Parameters
    ----------
    results
        Mapping of labels (policy names) to :class:`~lloptim.runtime.engine.RunResult` of the
        same problem.
    path
        Image file to write (format from the suffix).
    title
        Figure title.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), constrained_layout=True)
    plot_latency(ax1, results, "latency distribution")
    for i, (label, res) in enumerate(dict(results).items()):
        arrival = res.problem.workload.arrival_s
        ax2.scatter(arrival, res.done_s - arrival, s=3, color=f"C{i}", alpha=0.5, label=label, linewidths=0)
    ax2.set_xlabel("arrival (s)")
    ax2.set_ylabel("end-to-end latency (s)")
    ax2.set_title("latency of each request by its arrival")
    ax2.legend(fontsize="small", markerscale=4)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reproduction(report: dict, results: dict[str, RunResult], path: str | Path) -> Path:
    """Timelines of baseline and hybrid, the case-study utilizations and the noise curve, to ``path``.

    Parameters
    ----------
    report
        The report of :func:`~lloptim.experiments.reproduce`.
    results
        Its runs keyed by policy name; ``"baseline"`` and ``"hybrid"`` are drawn.
    path
        Image file to write (format from the suffix).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    fig = plt.figure(figsize=(14, 10), constrained_layout=True)
    gs = fig.add_gridspec(3, 2, height_ratios=[1.2, 1.2, 1])
    plot_timeline(fig.add_subplot(gs[0, :]), results["baseline"], "baseline")
    plot_timeline(fig.add_subplot(gs[1, :]), results["hybrid"], "hybrid")
    ax = fig.add_subplot(gs[2, 0])
    cases = report["cases"]["per_case"]
    if cases:
        base = [100 * c["baseline"]["utilization"] for c in cases]
        hyb = [100 * c["hybrid"]["utilization"] for c in cases]
        bins = np.linspace(min(base + hyb) - 0.5, max(base + hyb) + 0.5, 30)
        ax.hist(base, bins=bins, alpha=0.7, label="baseline")
        ax.hist(hyb, bins=bins, alpha=0.7, label="hybrid")
        ax.legend()
    ax.set_title(f"utilization over {len(cases)} GSM8K-train cases")
    ax.set_xlabel("utilization (%)")
    ax.set_ylabel("cases")
    ax = fig.add_subplot(gs[2, 1])
    noise = report.get("noise", [])
    if noise:
        for i, name in enumerate(dict.fromkeys(n["policy"] for n in noise)):
            rows = [n for n in noise if n["policy"] == name]
            ax.plot([n["sigma"] for n in rows], [100 * n["gap_to_bound"] for n in rows], "o-", color=f"C{i}",
                    label=f"{name}, noisy forecasts")
            unk = report["policies"].get(unknown_lengths_key(name))
            if unk:
                ax.axhline(100 * unk["gap_to_bound"], color=f"C{i}", ls="--",
                           label=f"{name}, {report.get('estimator')} estimator")
        ax.axhline(100 * report["policies"]["baseline"]["gap_to_bound"], color="C3", ls=":", label="baseline")
        ax.set_yscale("log")
        ax.legend(fontsize="small")
    ax.set_title("gap to the lower bound vs forecast noise (unknown output lengths)")
    ax.set_xlabel("sigma of exp(N(0, sigma)) forecast error")
    ax.set_ylabel("gap to bound (%)")
    fig.legend(handles=[matplotlib.patches.Patch(color=v, label=k) for k, v in COLORS.items()],
               loc="outside lower center", ncols=3)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
