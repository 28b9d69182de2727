#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA GPU (CI has none): the @pytest.mark.gpu tests, then the
# MoE overhead benchmark on the GPU at the issue's 2048 tokens and at 16384, fp32 and bf16, and the
# whole BGE-M3-shaped encoder step with and without an upcycled layer (benchmarks/moe_step.py),
# and jobs/train.py's step with its tokens/s and MFU (benchmarks/train_mfu.py).
# GPU_CHECK_BENCHMARKS=0 runs the tests alone.
#
#   scripts/gpu_check.sh [LOG_DIR]        (default: outputs/gpu_check)
#
# Uses $PYTHON (default: .venv/bin/python, else python3). If a folder .whl/ holds wheels, they are
# installed into /tmp/clp-ray-site first: that is how packages reach a GPU machine without an
# index. Exits 2 without a GPU, else with the tests' status; every step's output is also
# written to LOG_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-outputs/gpu_check}
mkdir -p "$logs"
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/clp-ray-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/clp-ray-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# Without a GPU every test would be skipped and the run would pass having checked nothing.
"$py" - <<'EOF' 2>&1 | tee "$logs/versions.txt"
import importlib, sys
mods = {}
for name in ("torch", "transformers", "tokenizers", "deepspeed", "pydantic"):
    try:
        mods[name] = importlib.import_module(name)
    except ImportError as e:
        sys.exit(f"gpu_check: {name} cannot be imported ({e}); install the project, or carry wheels in .whl/")
torch = mods["torch"]
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; nothing to check here")
print("torch", torch.__version__, "cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0))
for name in ("transformers", "tokenizers", "deepspeed", "pydantic"):
    print(name, mods[name].__version__)
EOF
[ "${PIPESTATUS[0]}" = 0 ] || exit 2
rm -f "$logs"/moe_overhead_cuda_*.txt "$logs"/moe_step_cuda.txt "$logs"/train_mfu_cuda.*

"$py" -m pytest -p no:cacheprovider -v -m gpu tests/test_gpu.py 2>&1 | tee "$logs/gpu_tests.log"
rc=${PIPESTATUS[0]}

if [ "${GPU_CHECK_BENCHMARKS:-1}" = 1 ]; then
  for tokens in 2048 16384; do
    for dtype in fp32 bf16; do
      "$py" benchmarks/moe_overhead.py --device cuda --dtype "$dtype" --tokens "$tokens" --repeats 50 2>&1 \
        | tee -a "$logs/moe_overhead_cuda_${tokens}.txt"
    done
  done
  "$py" benchmarks/moe_step.py --device cuda --dtype bf16 2>&1 | tee "$logs/moe_step_cuda.txt"
  # jobs/train.py's step (ZeRO-2 bf16, BGE-M3 shape, 8 passages of 256 tokens): tokens/s and MFU.
  "$py" benchmarks/train_mfu.py --device cuda --summary "$logs/train_mfu_cuda.json" 2>&1 | tee "$logs/train_mfu_cuda.txt"
  # Gradient caching: peak memory and examples/s by batch (BGE-M3 shape, bf16; uncached up to 128).
  "$py" benchmarks/grad_cache_memory.py --device cuda --uncached-up-to 128 --summary "$logs/grad_cache_cuda.json" 2>&1 \
    | tee "$logs/grad_cache_cuda.txt"
fi
echo "gpu tests exit status: $rc"
exit "$rc"
