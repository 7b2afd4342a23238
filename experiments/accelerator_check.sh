#!/usr/bin/env bash
# The accelerator check: on a machine with a TPU or an NVIDIA GPU, in under 5 minutes,
#   1. the attention-kernel tests run natively (splash on TPU, cudnn on GPU: the same
#      tests/test_model_kernels.py that the CPU suite runs in Pallas interpret mode),
#   2. a gpt2-small bfloat16 train-step benchmark, tokens/s, attention_impl=auto (the
#      platform's kernel) next to chunked in the same run (experiments/bench_train.py),
#   3. a gpt2-small bfloat16 decode benchmark, batch 1 and 8 (experiments/bench_decode.py).
#
#   bash experiments/accelerator_check.sh          # from anywhere; runs in the repo root
#
# Without a TPU or GPU it refuses (exit 2): nothing here is meaningful on a CPU, whose
# kernel tests are part of the ordinary suite. Each step has its own time limit, so the
# whole script ends within 5 minutes even if a step hangs; a step that fails or runs out
# of time is reported and the next one still runs; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

# tests/conftest.py pins JAX_PLATFORMS=cpu only when it is unset: empty lets JAX pick the
# accelerator.
export JAX_PLATFORMS=""
platform=$(python -c "import jax; print(jax.devices()[0].platform)" 2>/dev/null || echo none)
case "$platform" in
  tpu) kernel=splash ;;
  gpu) kernel=cudnn ;;
  *)
    echo "accelerator_check: no TPU or GPU here (JAX platform: $platform); the CPU suite" \
         "already runs these kernel tests in interpret mode:" \
         "python -m pytest tests/test_model_kernels.py" >&2
    exit 2 ;;
esac

failed=0
step() {  # step SECONDS TITLE COMMAND...
  local limit=$1 title=$2 start=$SECONDS
  shift 2
  echo "== $title (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    failed=1
    if [ "$rc" -eq 124 ]; then echo "!! $title: out of time after ${limit}s"
    else echo "!! $title: failed (exit $rc)"; fi
  fi
  echo "== $title: $((SECONDS - start))s"
}

python -c "import jax; print('jax', jax.__version__, jax.devices())"
step 85 "kernel tests, native $kernel on $platform" \
  python -m pytest -q -p no:cacheprovider tests/test_model_kernels.py -k "$kernel or auto"
for impl in auto chunked; do
  step 70 "train step, gpt2-small bfloat16, batch 16 x 1024, attention_impl=$impl" \
    python -m experiments.bench_train --presets=gpt2-small --dtype=bfloat16 \
      --attention_impl="$impl" --rounds=2
done
step 55 "decode, gpt2-small bfloat16, attention_impl=auto" \
  python -m experiments.bench_decode --presets=gpt2-small --batches=1,8 --dtype=bfloat16 \
    --attention_impl=auto --new_tokens=128 --repeats=3
echo "accelerator_check: $platform, ${SECONDS}s in all; $([ $failed = 0 ] && echo ok || echo FAILED)"
exit $failed
