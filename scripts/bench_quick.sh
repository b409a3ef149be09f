#!/usr/bin/env bash
# Every bench in its quickest mode, one after another: does each still run end to end? (Not its figures:
# at these sizes they mean nothing, and targets that a bench prints as MISS are not failures here.)
#
#   bash scripts/bench_quick.sh                  # all of them, ~10 min on 2 cores
#   bash scripts/bench_quick.sh step memory      # only these (names as printed)
#   bash scripts/bench_quick.sh --list           # the commands, nothing run
#
# Prints `PASS name seconds`, `FAIL name` (with its log's tail) or `SKIP name (why)` for each, then a count
# line; exits 1 if any failed. Every bench/*.py but the helpers (bench/_*.py) must have an entry below: one
# without fails as such. bench/gpu_check.py is run by `bash bench/gpu_check.sh --cpu-smoke`. The benches
# that compare against TRL need trl (pip install -r bench/requirements-trl.txt): without it they are
# skipped, and vs_trl runs its dpo_ds side alone (--no-trl). Logs: $BENCH_QUICK_LOGS (default a temp dir).
# Each entry has BENCH_QUICK_TIMEOUT_S (default 600) seconds.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
LIMIT=${BENCH_QUICK_TIMEOUT_S:-600}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

HAVE_TRL=0
"$PY" -c "import trl" >/dev/null 2>&1 && HAVE_TRL=1
NO_TRL="needs trl: pip install -r bench/requirements-trl.txt"

# name | needs trl (1/0) | command (run with bash from the repository root; $PY is the interpreter)
ENTRIES=(
    "data_prep|1|\$PY bench/data_prep.py --quick"
    "generation|0|\$PY bench/generation.py --hidden 64 --layers 2 --batch 4 --evals 2 --steps-per-eval 1 --samples 2 --new-tokens 8"
    "gpu_check|0|PYTHON=\$PY bash bench/gpu_check.sh --cpu-smoke"
    "logprobs|0|TRITON_INTERPRET=1 \$PY bench/logprobs.py --tokens 32 --vocab 1000 --reps 1 --triton --hidden 64 --lm-tokens 64 --fused-tokens 32"
    "long_context|0|\$PY bench/long_context.py --smoke"
    "lora_parity|1|\$PY bench/lora_parity.py --steps 2 --pairs 4"
    "loss_parity|1|\$PY bench/loss_parity.py --pairs 8"
    "memory|0|\$PY bench/memory.py --smoke"
    "plan_check|0|\$PY bench/plan_check.py --quick"
    "step|0|\$PY bench/step.py --hidden 64 --layers 2 --batch 4 --micro 2 --steps 3 --warmup 1 --max-length 64 --data chat"
    "triton_kernels|0|\$PY bench/triton_kernels.py --targets 90"
    "vs_trl|0|\$PY bench/vs_trl.py --hidden 64 --layers 2 --steps 3 --skip 1 --batch-size 4 --max-length 64 --max-prompt-length 32 --prompt-median 12 --response-median 16 --rounds 1"
)

LIST=0
ONLY=()
for a in "$@"; do
    case $a in
        --list) LIST=1 ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) ONLY+=("$a") ;;
    esac
done
wanted() { [ ${#ONLY[@]} -eq 0 ] || [[ " ${ONLY[*]} " == *" $1 "* ]]; }

# every bench/*.py needs an entry (helpers bench/_*.py; gpu_check.py is gpu_check.sh's half)
known=" "
for e in "${ENTRIES[@]}"; do known+="${e%%|*} "; done
for n in "${ONLY[@]}"; do
    [[ $known == *" $n "* ]] || [ -f "bench/$n.py" ] || { echo "unknown bench: $n (see --list)" >&2; exit 2; }
done
MISSING=()
for f in bench/*.py; do
    n=$(basename "$f" .py)
    [[ $n == _* ]] && continue
    [[ $known == *" $n "* ]] || MISSING+=("$n")
done

if [ $LIST = 0 ]; then
    LOGS=${BENCH_QUICK_LOGS:-$(mktemp -d /tmp/bench_quick.XXXXXX)}
    mkdir -p "$LOGS"
fi
pass=0 fail=0 skip=0
FAILED=()
start=$SECONDS
[ $LIST = 1 ] || echo "== bench_quick: python $PY, logs in $LOGS$([ $HAVE_TRL = 1 ] || echo ", trl not installed")"
for n in "${MISSING[@]}"; do
    if wanted "$n"; then
        echo "FAIL $n (bench/$n.py has no entry in scripts/bench_quick.sh)"
        fail=$((fail + 1))
        FAILED+=("$n")
    fi
done
for e in "${ENTRIES[@]}"; do
    name=${e%%|*}
    rest=${e#*|}
    trl=${rest%%|*}
    cmd=${rest#*|}
    wanted "$name" || continue
    if [ "$name" = vs_trl ] && [ $HAVE_TRL = 0 ]; then cmd+=" --no-trl"; fi
    if [ $LIST = 1 ]; then
        echo "$name: ${cmd//\$PY/$PY}"
        continue
    fi
    if [ "$trl" = 1 ] && [ $HAVE_TRL = 0 ]; then
        echo "SKIP $name ($NO_TRL)"
        skip=$((skip + 1))
        continue
    fi
    log=$LOGS/$name.log
    t0=$SECONDS
    PY=$PY timeout -k 10 "$LIMIT" bash -c "$cmd" >"$log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then
        echo "PASS $name $((SECONDS - t0))"
        pass=$((pass + 1))
    else
        echo "FAIL $name (exit $rc after $((SECONDS - t0)) s; $log), its last lines:"
        grep -v "\[WARNING\]" "$log" | tail -n 15 | sed 's/^/    /'
        fail=$((fail + 1))
        FAILED+=("$name")
    fi
done
[ $LIST = 1 ] && exit 0
echo "== $pass passed, $fail failed, $skip skipped in $((SECONDS - start)) s${FAILED:+ (failed: ${FAILED[*]})}"
[ $fail = 0 ]
