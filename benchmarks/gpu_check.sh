#!/usr/bin/env bash
# The issue-15 GPU check on a machine with torch (CUDA) and transformers >= 5.16.1 but no package index.
#
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--tiny] [--requests N] [--clients N] [--budget-s S] [--out FILE]
#
# 1. Stages lloptim as the package-dir mapping installs it (formulations/ and solvers/ copied under
#    lloptim/) in a temporary folder and puts it first on PYTHONPATH; nothing is installed.
# 2. Unpacks, into the same folder, the wheels of what the machine lacks among lloptim's
#    dependencies (highspy; pydantic with pydantic-core, annotated-types, typing-inspection and a
#    recent typing-extensions; psutil), from $LLOPTIM_WHEELS (default wheels/gpu, git-ignored).
#    Fetch them beforehand where the package index is reachable (21 MB with numpy, which pip adds
#    as highspy's dependency and the script never unpacks; 5 MB are used):
#
#      pip download --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
#          -d wheels/gpu "highspy>=1.7,<1.16" "pydantic>=2.5,<3" "psutil>=5.9"
#
#    and carry wheels/gpu to the GPU machine with the checkout.
# 3. Runs benchmarks/gpu_check.py with the arguments given (default: --device cuda, the issue's
#    TinyLlama-1.1B-shaped random model in bfloat16 on 512 GSM8K test requests, 128 clients,
#    about 6-8 minutes on an H100-class GPU) and writes its JSON (default benchmarks/results/gpu_check.json).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${LLOPTIM_WHEELS:-$ROOT/wheels/gpu}"
SITE="$(mktemp -d "${TMPDIR:-/tmp}/lloptim-gpu-XXXXXX")"
trap 'rm -rf "$SITE"' EXIT

cp -r "$ROOT/lloptim" "$SITE/lloptim"
cp -r "$ROOT/formulations" "$SITE/lloptim/formulations"
cp -r "$ROOT/solvers" "$SITE/lloptim/solvers"
find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +

# module to import -> the wheels to unpack when it is missing
"$PY" - "$WHEELS" "$SITE" <<'PYEOF'
import importlib.util, pathlib, sys, zipfile
wheels, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
needs = {"highspy": ["highspy-*.whl"],
         "pydantic": ["pydantic-[0-9]*.whl", "pydantic_core-*.whl", "annotated_types-*.whl",
                      "typing_inspection-*.whl", "typing_extensions-*.whl"],
         "psutil": ["psutil-*.whl"]}
for module, patterns in needs.items():
    if importlib.util.find_spec(module) is not None:
        continue
    for pattern in patterns:
        found = sorted(wheels.glob(pattern))
        if not found:
            sys.exit(f"gpu_check.sh: {module} is not installed and {wheels} has no {pattern}; fetch the "
                     "wheels with the pip download line at the top of benchmarks/gpu_check.sh")
        with zipfile.ZipFile(found[-1]) as z:
            z.extractall(site)
        print(f"gpu_check.sh: {module} missing, unpacked {found[-1].name}", file=sys.stderr)
PYEOF

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export LLOPTIM_MODEL_DIR="${LLOPTIM_MODEL_DIR:-$SITE/models}"
cd "$ROOT"
"$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
