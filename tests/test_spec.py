"""The declarative spec: valid documents load, invalid ones fail with a named SpecError."""

import math
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Problem, SpecError, Workload, load_spec
from lloptim.errors import ProfileError
from lloptim.problem import Instance

VALID = """
name = "tiny"

[[requests]]
id = "a"
prompt_tokens = 10
output_tokens = 5

[[requests]]
id = "b"
prompt_tokens = 7
output_tokens = 3
arrival_s = 1.5

[[instances]]
profile = "llama-65b"
clients = 2
"""


def test_valid_spec_loads():
    p = load_spec(text=VALID)
    assert p.n_requests == 2 and p.n_clients == 2
    assert p.workload.ids == ("a", "b")
    assert p.workload.arrival_s.tolist() == [0.0, 1.5]
    assert p.instances[0].profile.name == "llama-65b"


def test_default_spec_is_gsm8k_test():
    p = load_spec()
    assert p.n_requests == 1319
    assert p.workload.total_output_tokens == 132_872
    assert p.n_clients == 40


def test_spec_from_file_and_synthetic(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[workload]\nsource = "synthetic"\nn = 50\nseed = 3\n[[instances]]\ncount = 2\nclients = 4\n')
    p = load_spec(f)
    assert p.n_requests == 50 and len(p.instances) == 2 and p.n_clients == 8


@pytest.mark.parametrize("text, field", [
    (VALID.replace("prompt_tokens = 10", "prompt_tokens = -3"), "requests[0].prompt_tokens"),
    (VALID.replace("clients = 2", "clients = 0"), "instances[0].clients"),
    (VALID.replace('profile = "llama-65b"', 'profile = "gpt-17"'), "instances[0].profile"),
    (VALID.replace('id = "b"', 'id = "a"'), "requests[1].id"),
    (VALID.replace("output_tokens = 5", "output_tokens = 5\nmax_output_tokens = 30000"), "requests[0]"),
    ('name = "x"\n[[instances]]\nprofile = "llama-65b"\n', ""),
    (VALID.replace("output_tokens = 3", 'output_tokens = "3"'), "requests[1].output_tokens"),
    (VALID + "\nfoo = 1\n", "instances[0].foo"),
    ("foo = 1\n" + VALID, "foo"),
    ("[[requests]\n", ""),
])
def test_bad_specs_name_the_field(text, field):
    with pytest.raises(SpecError) as exc:
        load_spec(text=text)
    assert exc.value.field.startswith(field)
    assert exc.value.fix, "every error says how to fix it"


def test_request_longer_than_kv_cache():
    with pytest.raises(SpecError, match="KV tokens"):
        Problem.single(Workload.from_arrays([20_000], [1000]), "llama-65b")


def test_empty_workload_and_python_validation():
    with pytest.raises(SpecError, match="empty"):
        Workload.from_arrays([], [])
    with pytest.raises(SpecError) as exc:
        Workload.from_arrays([1, 2], [3, 0])
    assert exc.value.field == "requests[1].output_tokens"
    with pytest.raises(ProfileError):
        Instance.from_profile("nope")
    with pytest.raises(SpecError):
        Instance.from_profile("llama-65b", clients=0)


# --- hypothesis: mutate valid documents; every failure must be the library's own named error ------

def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(type(value))


def _render(doc: dict) -> str:
    lines = []
    for k, v in doc.items():
        if not isinstance(v, (dict, list)) or (isinstance(v, list) and v and not isinstance(v[0], dict)):
            lines.append(f"{k} = {_toml(v)}")
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {_toml(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines.append(f"[[{k}]]")
                lines += [f"{kk} = {_toml(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=string.ascii_letters + string.digits + " -_.", max_size=12), st.booleans(),
    st.lists(st.integers(-5, 5), max_size=3),
)


def _base_doc() -> dict:
    return {
        "name": "h",
        "requests": [{"id": "a", "prompt_tokens": 10, "output_tokens": 5},
                     {"id": "b", "prompt_tokens": 4, "output_tokens": 9, "arrival_s": 0.5}],
        "instances": [{"profile": "llama-65b", "clients": 3, "kv_capacity_tokens": 4096}],
    }


@st.composite
def mutated_specs(draw):
    doc = _base_doc()
    kind = draw(st.sampled_from(["set", "delete", "extra", "syntax", "workload"]))
    section = draw(st.sampled_from(["requests", "instances", "top"]))
    if section == "top":
        target = doc
    else:
        target = draw(st.sampled_from(doc[section]))
    keys = [k for k in target if not isinstance(target[k], list) or section != "top"]
    if kind == "set" and keys:
        target[draw(st.sampled_from(keys))] = draw(scalars)
    elif kind == "delete" and keys:
        del target[draw(st.sampled_from(keys))]
    elif kind == "extra":
        target[draw(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8))] = draw(scalars)
    elif kind == "workload":
        doc["workload"] = {"source": draw(st.sampled_from(["gsm8k", "synthetic", "csv"])),
                           "n": draw(st.integers(-5, 50)), "limit": draw(st.integers(-5, 50))}
        if draw(st.booleans()):
            del doc["requests"]
    text = _render(doc)
    if kind == "syntax":
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(["[", "=", '"', "]]", "\n[[x", "= =", "\x00"])) + text[pos:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_mutated_specs_fail_only_with_named_errors(text):
    try:
        problem = load_spec(text=text)
    except SpecError as exc:
        assert str(exc)
        assert exc.fix or exc.problem
        return
    assert isinstance(problem, Problem)
    assert problem.n_requests >= 1 and problem.n_clients >= 1
