#!/usr/bin/env bash
# GPU proof (issue 17): the platform's DeepSpeed training step, memory model and GPU serving
# path on one CUDA GPU, for a lent machine that has torch but no Ray, no DeepSpeed, no network.
#
#   scripts/gpu_check.sh --fetch-wheels                 here: DeepSpeed and what it needs into .whl/
#   scripts/gpu_check.sh --out "$OUT"                   there (carry .whl): install them, run every part
#   scripts/gpu_check.sh --device cpu --tiny --out DIR  the CPU dry run (tests/unit/test_gpu_check.py)
#
# Writes DIR/results.json, DIR/summary.md, a JSON file per part and DIR/check.log; exits 1
# when any configuration failed its checks, any part crashed, or a gpu-marked test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=cuda TINY="" OUT="" FETCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) TINY=--tiny; shift ;;
    --out) OUT=$2; shift 2 ;;
    --fetch-wheels) FETCH=1; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1'; see the header of $0 for usage" >&2; exit 2 ;;
  esac
done

# What the GPU image lacks (its torch, numpy, safetensors, pyyaml, pytest are used as they are):
# DeepSpeed (built here from its sdist into a pure-Python wheel: no ops prebuilt, so DeepSpeed
# JIT-compiles what it needs there against that machine's torch) and pydantic for the specs.
WHEELS=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 hjson==3.1.0)
DEEPSPEED=deepspeed==0.19.8
if [ -n "$FETCH" ]; then
  set -e
  rm -rf .whl && mkdir -p .whl
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w .whl "$DEEPSPEED"
  du -sh .whl && ls .whl
  exit 0
fi
[ -n "$OUT" ] || { echo "gpu_check.sh: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$DEVICE" = cuda ]; then
  SITE=$(mktemp -d /tmp/gpu-check-site.XXXX)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
[ "$DEVICE" = cuda ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; }

# Each part in its own process with its own time limit: a crash or a hang in one (a CUDA
# fault, a stuck collective) leaves the others' results. About 8 minutes in all on an H100.
declare -A LIMIT=([train]=180 [memory]=150 [width]=160 [serve]=45)
rc=0
# DeepSpeed's CPU Adam (optimizer offload) is compiled on first use, about a minute: start it
# now, beside the first configurations; the training part waits on the same build lock.
if [ "$DEVICE" = cuda ]; then
  "$PYTHON" -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
    > "$OUT/cpu_adam_build.log" 2>&1 &
fi
for part in train memory width serve; do
  echo "== $part (limit ${LIMIT[$part]} s)"
  start=$SECONDS
  timeout "${LIMIT[$part]}" "$PYTHON" tests/benchmarks/gpu_check.py --device "$DEVICE" $TINY --out "$OUT" "$part"
  code=$?
  echo "== $part exit $code after $((SECONDS - start)) s"
  [ $code -eq 0 ] || rc=1
done

# The gpu-marked tests: those that need no Ray run; the Ray ones skip with the reason.
echo "== gpu-marked tests"
timeout 60 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -o addopts="-ra --strict-markers" \
  tests/unit/test_train_engine_gpu.py tests/integration/test_train_gpu.py --junitxml="$OUT/pytest.xml"
code=$?
# 5: nothing selected/collected ran (a CPU skips them all), which is no failure here.
[ $code -eq 0 ] || [ $code -eq 5 ] || rc=1
"$PYTHON" - "$OUT" <<'PY'
import json, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
suite = ET.parse(f"{out}/pytest.xml").getroot()
suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
cases = [{"name": c.get("classname", "") + "::" + c.get("name", ""),
          "outcome": next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed"),
          "message": next((child.get("message", "") for child in c), "")} for c in suite.iter("testcase")]
counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
json.dump({"summary": ", ".join(f"{v} {k}" for k, v in counts.items() if v), "cases": cases},
          open(f"{out}/pytest.json", "w"), indent=1)
PY

"$PYTHON" tests/benchmarks/gpu_check.py --out "$OUT" report || rc=1
echo "== gpu check exit $rc; results in $OUT/results.json and $OUT/summary.md"
exit $rc
