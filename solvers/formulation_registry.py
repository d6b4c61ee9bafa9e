"""Formulations by name: how :func:`lloptim.solve` turns a problem into a model and back.

A :class:`Formulation` bundles the hooks the solve pipeline calls, in this order:

1. ``prepare(problem, **options) -> data``: validate and compute the formulation's numbers (the
   bin packing's weights); options are the keyword arguments given to ``solve``;
2. ``bound(data) -> float`` (optional): a proven bound on the optimum, computed before any search;
3. ``incumbent(data, params, deadline) -> Incumbent`` (optional): a feasible answer from a fast
   heuristic; it is the fallback answer, the MIP start, and, when it already meets ``rel_gap``
   against the bound, the whole answer (the search is skipped and the result says so);
4. ``build(data, bound, cutoff) -> Model``: the model, free to use the bound and the incumbent's
   objective (``cutoff``) to tighten itself;
5. ``decode(data, model, x) -> (answer, objective[, extra])``: the answer in the problem's terms
   and its objective recomputed from the problem (``answer`` None when ``x`` does not decode);
6. ``certify(data, multipliers) -> (multipliers, bound)`` (optional): prices to report and the
   bound they prove (the bin packing's Lagrangian bound of its load prices);
7. ``search(data) -> bool`` (optional, asked before step 4): whether the model is worth searching
   on this instance; False keeps the incumbent as the answer (status ``heuristic`` unless it meets
   ``rel_gap``) and says so in :attr:`SolveResult.skipped` (a formulation exact only on small
   cases, like ``"precedence"``).

A user formulation registered with :func:`register_formulation` gets the same treatment as the
built-in ``"binpacking"`` and ``"full_mip"`` (:mod:`lloptim.solvers.builtin_formulations`): MIP
starts, bounds, the skip, the fallback on a time-out, and the checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from lloptim.errors import SpecError

__all__ = ["Formulation", "Incumbent", "register_formulation", "get_formulation", "all_formulations"]


@dataclass
class Incumbent:
    """A feasible answer found before the search (the start).

    Attributes
    ----------
    answer
        The answer in the problem's terms (an assignment for the bin packing).
    objective
        Its objective value, in the objective's units.
    values
        The model's variable values encoding it, for a MIP start: a dict (variable name ->
        values shaped like the variable), or a callable taking the built :class:`~lloptim.Model`
        and returning such a dict or a full column vector; None: no MIP start.
    source
        Name of the heuristic that found it (reported as the backend when the search is skipped).
    extra
        Details for :attr:`SolveResult.extra`.
    """

    answer: Any
    objective: float
    values: Any = None
    source: str = "start"
    extra: dict = field(default_factory=dict)

    def values_for(self, model) -> dict | Any:
        """The start values for ``model`` (calls :attr:`values` when it is a callable).

        Parameters
        ----------
        model : Model
            The built model.

        Returns
        -------
        dict or numpy.ndarray or None
            Values per variable name, or a column vector.
        """
        return self.values(model) if callable(self.values) else self.values


def _identity(problem, **options):
    """The default ``prepare`` hook: the problem is the data; any option is an error naming it."""
    if options:
        raise SpecError(f"options.{sorted(options)[0]}", "is not an option of this formulation",
                        "pass only the options its prepare hook takes")
    return problem


@dataclass(frozen=True)
class Formulation:
    """A formulation :func:`lloptim.solve` can solve a problem with (see the module docstring).

    Attributes
    ----------
    name
        Its name (``solve(problem, formulation=name)``).
    build
        ``build(data, bound, cutoff) -> Model``.
    decode
        ``decode(data, model, x) -> (answer, objective)`` or ``(answer, objective, extra)``.
    prepare
        ``prepare(problem, **options) -> data`` (default: the problem itself, no options).
    incumbent
        ``incumbent(data, params, deadline) -> Incumbent`` or None.
    bound
        ``bound(data) -> float`` or None.
    certify
        ``certify(data, multipliers) -> (multipliers, bound)`` or None.
    sense
        ``"min"`` or ``"max"``: the direction of the objective (to compare answers and bounds).
    description
        One line for listings.
    search
        ``search(data) -> bool`` or None (always search).
    """

    name: str
    build: Callable
    decode: Callable
    prepare: Callable = _identity
    incumbent: Callable | None = None
    bound: Callable | None = None
    certify: Callable | None = None
    sense: str = "min"
    description: str = ""
    search: Callable | None = None


_FORMULATIONS: dict[str, Formulation] = {}


def register_formulation(name: str, build: Callable, decode: Callable, prepare: Callable | None = None,
                         incumbent: Callable | None = None, bound: Callable | None = None,
                         certify: Callable | None = None, sense: str = "min",
                         description: str = "", search: Callable | None = None) -> Formulation:
    """Make a formulation available as ``lloptim.solve(problem, formulation=name)``.

    Parameters
    ----------
    name : str
        Its name (re-registering a name replaces the formulation).
    build : callable
        ``build(data, bound, cutoff) -> Model``: ``bound`` (or None) is the bound hook's value and
        ``cutoff`` (or None) the incumbent's objective, both in the objective's units.
    decode : callable
        ``decode(data, model, x) -> (answer, objective)`` (or with a third item, a dict of
        details): ``x`` is the backend's column vector of the compiled model.
    prepare : callable or None
        ``prepare(problem, **options) -> data``; None: the problem is the data and ``solve`` takes
        no formulation options.
    incumbent : callable or None
        ``incumbent(data, params, deadline) -> Incumbent``: a feasible answer within the
        deadline (:class:`~lloptim.solvers.limits.Deadline`).
    bound : callable or None
        ``bound(data) -> float``: a proven bound on the optimum.
    certify : callable or None
        ``certify(data, multipliers) -> (multipliers, bound)``: prices to report (from the
        backend's own multipliers, or None) and the bound they prove.
    sense : str
        ``"min"`` (default) or ``"max"``.
    description : str
        One line for listings.
    search : callable or None
        ``search(data) -> bool``: whether to search the model on this instance (False: the
        incumbent is the answer); None: always.

    Returns
    -------
    Formulation
        The registered formulation.

    Raises
    ------
    SpecError
        A bad name, a hook that is not callable, or an unknown sense.
    """
    if not isinstance(name, str) or not name or any(ch.isspace() for ch in name):
        raise SpecError("formulation", f"name {name!r} must be a non-empty string without spaces",
                        "give e.g. 'my-binpacking'")
    for what, hook in (("build", build), ("decode", decode), ("prepare", prepare), ("incumbent", incumbent),
                       ("bound", bound), ("certify", certify), ("search", search)):
        if hook is not None and not callable(hook):
            raise SpecError(f"formulation.{what}", f"must be callable, got {type(hook).__name__}",
                            "pass a function")
    if sense not in ("min", "max"):
        raise SpecError("formulation.sense", f"unknown sense {sense!r}", "use 'min' or 'max'")
    form = Formulation(name, build, decode, prepare or _identity, incumbent, bound, certify, sense, description,
                       search)
    _FORMULATIONS[name] = form
    return form


def get_formulation(name: str) -> Formulation:
    """The formulation called ``name``.

    Parameters
    ----------
    name : str
        A registered name.

    Returns
    -------
    Formulation
        The formulation.

    Raises
    ------
    SpecError
        Unknown name.
    """
    if not isinstance(name, str) or name not in _FORMULATIONS:
        raise SpecError("formulation", f"unknown formulation {name!r}", f"use one of {sorted(_FORMULATIONS)}")
    return _FORMULATIONS[name]


def all_formulations() -> dict[str, Formulation]:
    """Every registered formulation by name."""
    return dict(_FORMULATIONS)
