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
    kv_mode = "paged"     # optional: "paged" (vLLM, default) or "reserve"
    kv_block_tokens = 16  # optional: tokens per KV block
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
from lloptim.hardware import load_profile
from lloptim.problem import MAX_TOKENS, Instance, Problem, Workload
from lloptim import workloads
from lloptim.validation import read_text_file

__all__ = ["load_spec", "parse_spec", "default_problem", "spec_reference", "DEFAULT_SPEC", "SPEC_REFERENCE"]

#: The spec :func:`load_spec` uses when given neither a path nor a text (TOML).
DEFAULT_SPEC = """\
name = "gsm8k-test on llama-65b"

[workload]
source = "gsm8k"
split = "test"

[[instances]]
profile = "llama-65b"
"""

#: Where every key of a spec is described; every spec error's fix points there.
SPEC_REFERENCE = "`lloptim spec-reference` or the docs' 'Spec reference' page (docs/spec.rst)"


def _key(description: str, unit: str = "", default_text: str = "", **constraints) -> Any:
    """A field with its description, unit and (where the value says little) default in words.

    :func:`spec_reference` and the docs' spec reference read them; every key of a spec model
    should be declared with it.
    """
    extra = {k: v for k, v in (("unit", unit), ("default_text", default_text)) if v}
    return Field(description=description, json_schema_extra=extra or None, **constraints)


def _bounded(name: str) -> dict:
    """The pydantic constraints of synthetic parameter ``name`` (:data:`~lloptim.workloads.SYNTHETIC_LIMITS`)."""
    lim = workloads.SYNTHETIC_LIMITS[name]
    return {"gt" if lim.get("open") else "ge": lim["lo"], "le": lim["hi"]}


Tokens = Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)]
Seconds = Annotated[StrictInt | StrictFloat, Field(ge=0, le=1e9, allow_inf_nan=False)]
Number = StrictInt | StrictFloat


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestDoc(_Strict):
    """One ``[[requests]]`` entry: a request given by its token counts."""

    id: StrictStr | StrictInt | None = _key("Identifier of the request in reports; default: its row index "
                                            "(0, 1, ...). Ids must be unique.", default=None)
    prompt_tokens: Tokens = _key("Prompt length.", "tokens")
    output_tokens: Tokens = _key("True output length: the decode iterations the request takes part in.", "tokens")
    arrival_s: Seconds = _key("Arrival time, from the start of the run.", "seconds", default=0.0)
    max_output_tokens: Tokens | None = _key("Output cap the user set (max_tokens; at least output_tokens). A "
                                            "server knows the cap, not the true length: in reserve KV mode it "
                                            "reserves prompt + cap. Default: no cap.", "tokens", default=None)
    after: list[StrictStr | StrictInt] | None = _key(
        "Ids of the requests this one waits for: it can start only once all of them have finished (no "
        "cycles, no unknown ids). Default: none.", "request ids", default=None)


#: ``[workload]`` keys each source reads; any other key is an error (it would be silently ignored).
SOURCE_KEYS = {"gsm8k": ("split", "limit", "seed", "arrival_rate", "load"),
               "synthetic": ("n", "seed", "prompt_median", "output_median", "sigma", "max_tokens", "arrival_rate",
                             "load"),
               "workflow": ("shape", "workflows", "depth", "width", "seed", "split", "arrival_rate"),
               "azure": ("trace", "start", "limit", "time_scale", "load")}
#: Keys of ``[workload]`` that only ``source = "workflow"`` reads.
WORKFLOW_KEYS = ("shape", "workflows", "depth", "width")
SOURCE_KEYS_ORDER = tuple(dict.fromkeys(k for keys in SOURCE_KEYS.values() for k in keys))


class WorkloadDoc(_Strict):
    """The ``[workload]`` table: a shipped or generated workload."""

    source: Literal["gsm8k", "synthetic", "workflow", "azure"] = _key(
        "Where the requests come from: 'gsm8k' (the GSM8K split shipped with lloptim, LLaMA token counts), "
        "'synthetic' (seeded lognormal lengths), 'workflow' (seeded workflows of dependent requests on "
        "GSM8K lengths) or 'azure' (the Azure LLM inference traces of 2023, real arrivals).")
    split: Literal["test", "train"] = _key("gsm8k, workflow: the GSM8K split (1319 or 7473 requests).",
                                           default="test")
    limit: Annotated[StrictInt, Field(ge=1, le=workloads.MAX_REQUESTS)] | None = _key(
        "gsm8k: keep only the first limit requests of the split; azure: keep limit requests from start; "
        "default: all.", "requests", default=None)
    n: Annotated[StrictInt, Field(**_bounded("n"))] = _key("synthetic: number of requests.", "requests",
                                                           default=1000)
    seed: Annotated[StrictInt, Field(**_bounded("seed"))] = _key(
        "synthetic, workflow: seed of the generator; gsm8k: seed of the Poisson arrivals (with arrival_rate or "
        "load; synthetic with load draws its arrivals from it too).", default=0)
    prompt_median: Annotated[Number, Field(allow_inf_nan=False, **_bounded("prompt_median"))] = _key(
        "synthetic: median prompt length (at most max_tokens).", "tokens", default=70.0)
    output_median: Annotated[Number, Field(allow_inf_nan=False, **_bounded("output_median"))] = _key(
        "synthetic: median output length (at most max_tokens).", "tokens", default=90.0)
    sigma: Annotated[Number, Field(allow_inf_nan=False, **_bounded("sigma"))] = _key(
        "synthetic: shape of both lognormals (standard deviation of the log length); 0 makes every "
        "length the median.", "log tokens", default=0.5)
    max_tokens: Annotated[StrictInt, Field(**_bounded("max_tokens"))] = _key(
        "synthetic: lengths are clipped to [1, max_tokens].", "tokens", default=1024)
    arrival_rate: Annotated[Number, Field(allow_inf_nan=False, **_bounded("arrival_rate"))] | None = _key(
        "gsm8k, synthetic: Poisson arrivals of requests at this rate; workflow: of whole workflows (all "
        "requests of a workflow arrive together). Default: everything arrives at time 0.", "per second",
        default=None)
    load: Annotated[Number, Field(gt=0, le=1e3, allow_inf_nan=False)] | None = _key(
        "gsm8k, synthetic: Poisson arrivals at load x the fleet's capacity (requests over the lower bound of "
        "the same requests all at time 0; 1.2 is 20 % overload); azure: the trace's arrivals sped up or "
        "slowed down to that mean rate. Not with arrival_rate or time_scale. Default: no change.", "x capacity",
        default=None)
    trace: Literal["conv", "code"] = _key("azure: the conversation (19,366 requests) or the code (8,819) "
                                          "service's trace.", default="conv")
    start: Annotated[StrictInt, Field(ge=0, le=workloads.MAX_REQUESTS)] = _key(
        "azure: index of the first request kept (a window of the trace).", "requests", default=0)
    time_scale: Annotated[Number, Field(gt=0, le=1e6, allow_inf_nan=False)] = _key(
        "azure: factor on the trace's inter-arrival times (0.5 doubles the rate); not with load.", "x",
        default=1.0)
    shape: Literal["chain", "fan-in", "dag"] | None = _key(
        "workflow (required): 'chain' (solve -> verify -> revise), 'fan-in' (map -> reduce) or 'dag' (random "
        "layered DAGs).", default=None)
    workflows: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = _key("workflow: number of workflows.",
                                                                      "workflows", default=100)
    depth: Annotated[StrictInt, Field(ge=1, le=10_000)] | None = _key(
        "workflow: steps of a chain (default 3) or layers of a DAG (default 4); not for fan-in.", "steps",
        default=None)
    width: Annotated[StrictInt, Field(ge=1, le=10_000)] | None = _key(
        "workflow: map steps of every fan-in (default: 2 to 6, drawn per workflow) or the most requests in a "
        "DAG layer (default 4).", "requests", default=None)

    @model_validator(mode="after")
    def _keys_of_the_source(self) -> "WorkloadDoc":
        read = SOURCE_KEYS[self.source]
        stray = [k for k in SOURCE_KEYS_ORDER if k in self.model_fields_set and k not in read]
        if stray:
            owners = [src for src, keys in SOURCE_KEYS.items() if stray[0] in keys]
            raise ValueError(f"{stray[0]} is read only with source = {' or '.join(repr(o) for o in owners)}; "
                             f"remove it, or set source = {owners[0]!r}")
        if self.source == "workflow" and self.shape is None:
            raise ValueError("source = 'workflow' needs shape = 'chain', 'fan-in' or 'dag'")
        if self.load is not None and self.arrival_rate is not None:
            raise ValueError("give load or arrival_rate, not both (load sets the rate from the fleet's capacity)")
        if self.load is not None and "time_scale" in self.model_fields_set:
            raise ValueError("give load or time_scale, not both (load sets the trace's time scale)")
        return self


class InstanceDoc(_Strict):
    """One ``[[instances]]`` entry: model instances of one hardware profile."""

    profile: StrictStr = _key("Built-in profile name (llama-65b) or path of a profile .toml file (relative "
                              "paths resolve against the spec's folder).", default="llama-65b")
    clients: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = _key(
        "Concurrent request slots per instance; default: the profile's.", "clients", default=None)
    kv_capacity_tokens: Annotated[StrictInt, Field(ge=1, le=10**12)] | None = _key(
        "KV-cache capacity of each instance across its clients; every request's prompt + max(output, cap) must "
        "fit, in whole blocks. "
        "Default: the profile's.", "tokens", default=None)
    kv_mode: Literal["paged", "reserve"] | None = _key(
        "How the KV cache is managed: paged (blocks allocated as tokens are generated, preemption with "
        "recompute when they run out; vLLM) or reserve (prompt + the request's cap, else the policy's estimate, "
        "reserved at admission). Default: paged.", default=None)
    kv_block_tokens: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = _key(
        "Tokens per KV block (the instance holds kv_capacity_tokens // kv_block_tokens blocks). Default: 16.",
        "tokens", default=None)
    count: Annotated[StrictInt, Field(ge=1, le=100_000)] = _key("Identical instances of this entry.", "instances",
                                                                 default=1)


class SpecDoc(_Strict):
    """A whole spec: a workload (``[workload]`` or ``[[requests]]``) and the instances serving it."""

    name: StrictStr = _key("Name of the problem in reports.", default="problem")
    workload: WorkloadDoc | None = _key("A shipped or generated workload; give exactly one of [workload] and "
                                        "[[requests]].", default=None)
    requests: list[RequestDoc] | None = _key("The requests one by one (at least one); give exactly one of "
                                             "[workload] and [[requests]].", default=None)
    instances: list[InstanceDoc] = _key("The instances serving the workload, in order (global client indices "
                                        "follow it).", default_text="one llama-65b instance",
                                        default_factory=lambda: [InstanceDoc()])

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
        elif str(item).startswith("function-"):
            continue  # a model validator's label
        elif "[" in str(item) and "]" in str(item) and not str(item).isidentifier():
            continue  # union branch labels such as "int" / "float" add nothing for a user
        else:
            parts.append(str(item))
    return ".".join(parts)


def _with_reference(exc: SpecError) -> SpecError:
    """``exc`` with :data:`SPEC_REFERENCE` added to its fix (same class, same field)."""
    if SPEC_REFERENCE in exc.fix:
        return exc
    return exc.replace(fix=f"{exc.fix}; see {SPEC_REFERENCE}" if exc.fix else f"see {SPEC_REFERENCE}")


def parse_spec(data: dict[str, Any], base_dir: str | Path | None = None) -> Problem:
    """Validate a spec given as a dictionary (e.g. parsed TOML) and build the :class:`Problem`.

    Parameters
    ----------
    data
        The document.
    base_dir
        Folder against which relative profile paths are resolved.

    Raises
    ------
    SpecError
        Naming the offending key, with a fix that points to the spec reference
        (:data:`SPEC_REFERENCE`).
    """
    try:
        return _parse(data, base_dir)
    except SpecError as exc:
        raise _with_reference(exc) from None


def _parse(data: dict[str, Any], base_dir: str | Path | None) -> Problem:
    if not isinstance(data, dict):
        raise SpecError("", "the spec must be a table (a dict)", "write key = value pairs at the top level")
    try:
        doc = SpecDoc.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = _field_path(tuple(err.get("loc", ())))
        kind = err.get("type", "")
        fix = _FIXES.get(kind, "")
        if field.endswith(".after") or ".after[" in field:
            fix = 'write a list of the ids of other requests, e.g. after = ["solve-1"]'
        if kind == "value_error":
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            raise SpecError(field, msg, "") from None
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
                                           max_tokens=w.max_tokens,
                                           arrival_rate=None if w.arrival_rate is None else float(w.arrival_rate))
    else:
        reqs = doc.requests or []
        workload = Workload.from_arrays(
            [r.prompt_tokens for r in reqs], [r.output_tokens for r in reqs], [float(r.arrival_s) for r in reqs],
            [r.max_output_tokens if r.max_output_tokens is not None else 0 for r in reqs],
            ids=[str(r.id) if r.id is not None else str(i) for i, r in enumerate(reqs)], name=doc.name,
            after=[r.after for r in reqs] if any(r.after for r in reqs) else None)
    instances: list[Instance] = []
    for k, inst in enumerate(doc.instances):
        profile = inst.profile
        if base_dir is not None and profile.endswith(".toml") and not Path(profile).is_absolute():
            profile = str(base_dir / profile)
        try:
            prof = load_profile(profile)  # once per entry: a count of 100,000 must not parse it 100,000 times
        except SpecError as exc:
            raise exc.replace(field=f"instances[{k}].{exc.field}") from None
        first = Instance.from_profile(prof, inst.clients, inst.kv_capacity_tokens, name=f"instance-{len(instances)}",
                                      kv_mode=inst.kv_mode, kv_block_tokens=inst.kv_block_tokens)
        instances.append(first)
        start = len(instances)
        instances.extend(Instance(first.profile, first.clients, first.kv_capacity_tokens, f"instance-{start + j}",
                                  first.kv_mode, first.kv_block_tokens)
                         for j in range(inst.count - 1))
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
        Path of a TOML spec (UTF-8); relative profile paths in it resolve against its folder.
    text
        The TOML text itself; takes precedence over ``path``.

    Returns
    -------
    Problem
        The validated problem.

    Raises
    ------
    SpecError
        No file at ``path`` (or a folder, or not UTF-8), invalid TOML, or an invalid document;
        errors in the document point to the spec reference (:data:`SPEC_REFERENCE`).
    """
    base = None
    if text is None:
        if path is None:
            text = DEFAULT_SPEC
        else:
            text = read_text_file("spec", path, "TOML spec")
            base = Path(path).expanduser().parent
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _with_reference(SpecError("", f"the spec is not valid TOML: {exc}",
                                         "fix the TOML syntax at the position shown")) from None
    return parse_spec(data, base)


def default_problem() -> Problem:
    """The embedded default: GSM8K test on one ``llama-65b`` instance."""
    return load_spec()


def _schema_type(prop: dict, defs: dict) -> tuple[str, dict]:
    """The type of a JSON-schema property in words, and the schema node that holds its bounds."""
    if "$ref" in prop:
        return "table", defs[prop["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in prop:
        options = [p for p in prop["anyOf"] if p.get("type") != "null"]
        texts, node = [], {}
        for o in options:
            t, n = _schema_type(o, defs)
            texts.append(t)
            node = node or (n if any(k in n for k in ("minimum", "maximum", "exclusiveMinimum")) else {})
        words = list(dict.fromkeys(texts))
        if set(words) == {"integer", "number"}:
            words = ["number"]
        return " or ".join(words), node or (options[0] if options else {})
    if "enum" in prop or "const" in prop:
        values = prop.get("enum", [prop.get("const")])
        return "one of " + ", ".join(f'"{v}"' for v in values), prop
    if prop.get("type") == "array":
        item, _ = _schema_type(prop.get("items", {}), defs)
        return ("array of tables" if item == "table" else f"array of {item}"), prop
    return {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean"}.get(
        prop.get("type", ""), prop.get("type", "any")), prop


def _bounds_text(node: dict) -> str:
    def num(v):
        if isinstance(v, (int, float)) and float(v).is_integer() and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:g}" if isinstance(v, float) else str(v)

    # JSON-schema keywords, or pydantic's own names where it leaves a union's constraints as they are
    parts = []
    for keys, op in ((("exclusiveMinimum", "gt"), ">"), (("minimum", "ge"), ">="),
                     (("exclusiveMaximum", "lt"), "<"), (("maximum", "le"), "<=")):
        for k in keys:
            if k in node:
                v = node[k]
                parts.append("< 2**63" if op == "<=" and v == 2**63 - 1 else f"{op} {num(v)}")
                break
    return ", ".join(parts)


def _nested_table(prop: dict, defs: dict) -> tuple[dict, bool] | None:
    """The model a property holds (a table, or an array of tables), if any, and whether it is an array."""
    for option in prop.get("anyOf", [prop]):
        if "$ref" in option:
            return defs[option["$ref"].rsplit("/", 1)[-1]], False
        if option.get("type") == "array" and "$ref" in option.get("items", {}):
            return defs[option["items"]["$ref"].rsplit("/", 1)[-1]], True
    return None


def spec_reference() -> list[dict[str, Any]]:
    """Every key of a spec, read from the pydantic models: the source of the reference page.

    Returns
    -------
    list of dict
        One entry per key, tables before their keys, in document order: ``"key"`` (dotted path,
        ``[[...]]`` entries as ``requests[].prompt_tokens``), ``"table"`` (the TOML table it belongs
        to), ``"type"`` (in words), ``"unit"`` (empty when the value has none), ``"default"`` (as
        TOML, or ``"required"``, or a sentence), ``"bounds"`` (``">= 1, <= 10,000,000"``; empty when
        unbounded) and ``"description"``.
    """
    import json

    schema = SpecDoc.model_json_schema()
    defs = schema.get("$defs", {})
    rows: list[dict[str, Any]] = []

    def walk(node: dict, prefix: str, table: str) -> None:
        required = set(node.get("required", []))
        for key, prop in node.get("properties", {}).items():
            path = f"{prefix}{key}"
            kind, bnode = _schema_type(prop, defs)
            if key in required:
                default = "required"
            elif "default_text" in prop:
                default = prop["default_text"]
            elif "default" in prop:
                d = prop["default"]
                default = "not set" if d is None else (json.dumps(d) if not isinstance(d, list) else "see the description")
            else:
                default = "see the description"
            rows.append({"key": path, "table": table, "type": kind, "unit": prop.get("unit", ""),
                         "default": default, "bounds": _bounds_text({**bnode, **prop}),
                         "description": prop.get("description", "(undocumented)")})
            nested = _nested_table(prop, defs)
            if nested is not None:
                child, is_array = nested
                walk(child, f"{path}[]." if is_array else f"{path}.", f"[[{path}]]" if is_array else f"[{path}]")

    walk(schema, "", "top level")
    return rows
