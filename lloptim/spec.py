"""The declarative spec: a TOML document (or a dict) that describes a :class:`~lloptim.problem.Problem`.

Example::

    name = "gsm8k on one LLaMA-65B server"

    [workload]            # or a list of [[requests]]
    source = "gsm8k"      # "gsm8k", "synthetic", "workflow" or "azure"
    split = "test"
    load = 1.2            # optional: Poisson arrivals at 1.2 x the fleet's capacity

    [[instances]]
    profile = "llama-65b" # built-in name or path of a profile .toml
    clients = 40          # optional; defaults to the profile's
    count = 1             # identical replicas

A request may wait for others: ``after = ["solve-1"]`` in its ``[[requests]]`` table (ids of
other requests). ``source = "workflow"`` generates workflows of dependent requests on GSM8K
lengths (``shape = "chain"``, ``"fan-in"`` or ``"dag"``, ``workflows = 100``, optional ``depth``,
``width``, ``seed``, ``arrival_rate``; see :func:`lloptim.workloads.workflows`).

Requests arrive over time with ``arrival_rate`` (requests per second, Poisson; ``gsm8k`` and
``synthetic``) or ``load`` (the arrival rate over the fleet's capacity, :mod:`lloptim.arrivals`:
Poisson arrivals for ``gsm8k`` and ``synthetic``, seeded by ``seed``; for ``azure`` the trace's own
arrivals sped up or slowed down to that mean rate). ``source = "azure"`` reads an Azure LLM
inference trace of 2023 with its real arrival times (``trace = "conv"`` or ``"code"``, ``start``,
``limit``, ``time_scale``; see :func:`lloptim.workloads.azure_trace`).

Every invalid document raises :class:`~lloptim.errors.SpecError` naming the field and the fix.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator

from lloptim.errors import SpecError
from lloptim.problem import Instance, Problem, Workload
from lloptim import workloads

__all__ = ["load_spec", "parse_spec", "default_problem", "DEFAULT_SPEC"]

#: The spec :func:`load_spec` uses when given neither a path nor a text (TOML).
DEFAULT_SPEC = """\
name = "gsm8k-test on llama-65b"

[workload]
source = "gsm8k"
split = "test"

[[instances]]
profile = "llama-65b"
"""

Tokens = Annotated[StrictInt, Field(ge=1, le=10_000_000)]
Seconds = Annotated[StrictInt | StrictFloat, Field(ge=0, le=1e9, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestDoc(_Strict):
    id: StrictStr | StrictInt | None = None
    prompt_tokens: Tokens
    output_tokens: Tokens
    arrival_s: Seconds = 0.0
    max_output_tokens: Tokens | None = None
    after: list[StrictStr | StrictInt] | None = None


#: Keys of ``[workload]`` that only ``source = "workflow"`` reads.
WORKFLOW_KEYS = ("shape", "workflows", "depth", "width")
#: Keys of ``[workload]`` that only ``source = "azure"`` reads.
AZURE_KEYS = ("trace", "start", "time_scale")


class WorkloadDoc(_Strict):
    source: Literal["gsm8k", "synthetic", "workflow", "azure"]
    split: Literal["test", "train"] = "test"
    limit: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=10_000_000)] = 1000
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] = 0
    prompt_median: Annotated[StrictInt | StrictFloat, Field(gt=0, le=1e6, allow_inf_nan=False)] = 70.0
    output_median: Annotated[StrictInt | StrictFloat, Field(gt=0, le=1e6, allow_inf_nan=False)] = 90.0
    sigma: Annotated[StrictInt | StrictFloat, Field(ge=0, le=10, allow_inf_nan=False)] = 0.5
    arrival_rate: Annotated[StrictInt | StrictFloat, Field(gt=0, le=1e9, allow_inf_nan=False)] | None = None
    shape: Literal["chain", "fan-in", "dag"] | None = None
    workflows: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 100
    depth: Annotated[StrictInt, Field(ge=1, le=10_000)] | None = None
    width: Annotated[StrictInt, Field(ge=1, le=10_000)] | None = None
    trace: Literal["conv", "code"] = "conv"
    start: Annotated[StrictInt, Field(ge=0, le=10_000_000)] = 0
    time_scale: Annotated[StrictInt | StrictFloat, Field(gt=0, le=1e6, allow_inf_nan=False)] = 1.0
    load: Annotated[StrictInt | StrictFloat, Field(gt=0, le=1e3, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _workflow_keys(self) -> "WorkloadDoc":
        if self.source == "workflow":
            if self.shape is None:
                raise ValueError("source = 'workflow' needs shape = 'chain', 'fan-in' or 'dag'")
        else:
            given = [k for k in WORKFLOW_KEYS if k in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]} is read only with source = 'workflow'")
        if self.source != "azure":
            given = [k for k in AZURE_KEYS if k in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]} is read only with source = 'azure'")
        if self.load is not None:
            if self.arrival_rate is not None:
                raise ValueError("give load or arrival_rate, not both (load sets the rate from the fleet's capacity)")
            if self.source == "workflow":
                raise ValueError("load is not read with source = 'workflow': give arrival_rate (workflows per second)")
            if self.source == "azure" and "time_scale" in self.model_fields_set:
                raise ValueError("give load or time_scale, not both (load sets the trace's time scale)")
        elif self.source == "azure" and self.arrival_rate is not None:
            raise ValueError("an Azure trace has its own arrivals: give time_scale or load, not arrival_rate")
        return self


class InstanceDoc(_Strict):
    profile: StrictStr = "llama-65b"
    clients: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None
    kv_capacity_tokens: Annotated[StrictInt, Field(ge=1, le=10**12)] | None = None
    count: Annotated[StrictInt, Field(ge=1, le=100_000)] = 1


class SpecDoc(_Strict):
    name: StrictStr = "problem"
    workload: WorkloadDoc | None = None
    requests: list[RequestDoc] | None = None
    instances: list[InstanceDoc] = Field(default_factory=lambda: [InstanceDoc()])

    @model_validator(mode="after")
    def _one_source(self) -> "SpecDoc":
        if (self.workload is None) == (self.requests is None):
            raise ValueError("give exactly one of [workload] or [[requests]]")
        if self.requests is not None and len(self.requests) == 0:
            raise ValueError("[[requests]] is empty")
        if not self.instances:
            raise ValueError("instances is empty")
        return self


_FIXES = {
    "missing": "add this key",
    "extra_forbidden": "remove this key or check its spelling",
    "int_type": "write a whole number without quotes",
    "float_type": "write a number without quotes",
    "string_type": "write a quoted string",
    "literal_error": "use one of the listed values",
    "greater_than_equal": "use a larger value",
    "greater_than": "use a larger value",
    "less_than_equal": "use a smaller value",
    "finite_number": "use a finite number",
    "list_type": "write an array of tables ([[...]])",
    "model_type": "write a table",
    "dict_type": "write a table",
}


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1 if parts else 0:] = [f"{parts[-1] if parts else ''}[{item}]"]
        elif item in ("function-after[_one_source()]", "function-after[_workflow_keys()]"):
            continue
        elif "[" in str(item) and "]" in str(item) and not str(item).isidentifier():
            continue  # union branch labels such as "int" / "float" add nothing for a user
        else:
            parts.append(str(item))
    return ".".join(parts)


def parse_spec(data: dict[str, Any], base_dir: str | Path | None = None) -> Problem:
    """Validate a spec given as a dictionary (e.g. parsed TOML) and build the :class:`Problem`.

    Parameters
    ----------
    data
        The document.
    base_dir
        Folder against which relative profile paths are resolved.
    """
    if not isinstance(data, dict):
        raise SpecError("", "the spec must be a table (a dict)", "write key = value pairs at the top level")
    try:
        doc = SpecDoc.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = _field_path(tuple(err.get("loc", ())))
        kind = err.get("type", "")
        fix = _FIXES.get(kind, "see the spec reference in the docs")
        if field.endswith(".after") or ".after[" in field:
            fix = 'write a list of the ids of other requests, e.g. after = ["solve-1"]'
        if kind == "value_error":
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            raise SpecError(field, msg, "see the spec reference in the docs") from None
        raise SpecError(field, f"{err.get('msg', 'invalid')} (got {err.get('input')!r})"[:300], fix) from None
    return _build(doc, Path(base_dir) if base_dir else None)


def _build(doc: SpecDoc, base_dir: Path | None) -> Problem:
    if doc.workload is not None:
        w = doc.workload
        if w.source == "gsm8k":
            workload = workloads.gsm8k(w.split, w.limit)
            if w.arrival_rate is not None:
                from lloptim.arrivals import poisson_arrivals

                workload = workload.with_arrivals(poisson_arrivals(len(workload), float(w.arrival_rate), w.seed))
        elif w.source == "azure":
            workload = workloads.azure_trace(w.trace, w.limit, w.start, float(w.time_scale))
        elif w.source == "workflow":
            workload = workloads.workflows(w.shape, w.workflows, seed=w.seed, split=w.split, depth=w.depth,
                                           width=w.width,
                                           arrival_rate=None if w.arrival_rate is None else float(w.arrival_rate))
        else:
            workload = workloads.synthetic(w.n, seed=w.seed, prompt_median=float(w.prompt_median),
                                           output_median=float(w.output_median), sigma=float(w.sigma),
                                           arrival_rate=None if w.arrival_rate is None else float(w.arrival_rate))
    else:
        reqs = doc.requests or []
        workload = Workload.from_arrays(
            [r.prompt_tokens for r in reqs], [r.output_tokens for r in reqs], [float(r.arrival_s) for r in reqs],
            [r.max_output_tokens if r.max_output_tokens is not None else r.output_tokens for r in reqs],
            ids=[str(r.id) if r.id is not None else str(i) for i, r in enumerate(reqs)], name=doc.name,
            after=[r.after for r in reqs] if any(r.after for r in reqs) else None)
    instances: list[Instance] = []
    for k, inst in enumerate(doc.instances):
        profile = inst.profile
        if base_dir is not None and profile.endswith(".toml") and not Path(profile).is_absolute():
            profile = str(base_dir / profile)
        try:
            for _ in range(inst.count):
                instances.append(Instance.from_profile(profile, inst.clients, inst.kv_capacity_tokens,
                                                       name=f"instance-{len(instances)}"))
        except SpecError as exc:
            raise SpecError(f"instances[{k}].{exc.field}", exc.problem, exc.fix) from None
    problem = Problem(workload, tuple(instances), name=doc.name)
    if doc.workload is not None and doc.workload.load is not None:
        from lloptim.arrivals import at_load, scale_to_load

        load = float(doc.workload.load)
        problem = scale_to_load(problem, load) if doc.workload.source == "azure" else at_load(problem, load,
                                                                                                doc.workload.seed)
    return problem


def load_spec(path: str | Path | None = None, text: str | None = None) -> Problem:
    """Load a TOML spec from ``path`` (or from ``text``); with neither, the embedded default.

    The default is the GSM8K test split (1319 requests) on one ``llama-65b`` instance.

    Parameters
    ----------
    path
        Path of a TOML spec; relative profile paths in it resolve against its folder.
    text
        The TOML text itself; takes precedence over ``path``.

    Returns
    -------
    Problem
        The validated problem.

    Raises
    ------
    SpecError
        No file at ``path``, invalid TOML, or an invalid document.
    """
    base = None
    if text is None:
        if path is None:
            text = DEFAULT_SPEC
        else:
            p = Path(path)
            if not p.is_file():
                raise SpecError("spec", f"no file at {str(p)!r}", "give the path of a TOML spec, or none for the default")
            text, base = p.read_text(), p.parent
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("", f"the spec is not valid TOML: {exc}", "fix the TOML syntax at the position shown") from None
    return parse_spec(data, base)


def default_problem() -> Problem:
    """The embedded default: GSM8K test on one ``llama-65b`` instance."""
    return load_spec()
