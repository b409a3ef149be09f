#!/usr/bin/env bash
# GPU check for dpo_ds on one lent H100/H200, prepared as ONE script that stays under 10 minutes.
#
#   bash bench/gpu_check.sh                # on the GPU machine (from the repository root or anywhere)
#   bash bench/gpu_check.sh --cpu-smoke    # here, without a GPU: the same stages at tiny sizes on CPU
#
# --cpu-smoke (CI runs it after the tests, ~2-3 min on 2 cores): every stage below end to end on CPU, gloo, one
# rank, TRITON_INTERPRET=1, so each stage's code path, argument plumbing and table printing run: (a) the
# parity tests with the Triton interpreter, (b) naive/chunked/triton at 64 tokens x vocab 1000 and 4000,
# (c) 3 DPO steps of a 0.2M Llama (vocab 1000) per layout with the triton log-probs, (g) 3 packed DPO steps of a
# 0.2M Qwen3-MoE (4 experts, top-2, vocab 1000) with the router loss, (d) memory.py's
# --gpu-short rows and module level on its 8.6M smoke model, (f) long_context.py --gpu on that model at 256
# and 512 tokens and 256 with tiled MLP. It says the figures are CPU smoke figures, not GPU results, and
# exits 1 if any stage failed, timed out, was skipped or left no result (the GPU mode's exit status and
# stages are unchanged; it prints the same list of stage problems, for information).
#
# Through the device tool (its machine has torch 2.11, triton 3.6, transformers 5.17, but no deepspeed,
# datasets or pydantic), carry the wheels built here:
#   run(command="bash bench/gpu_check.sh", carry=["bench/wheels"], timeout_s=600)
# $OUT/gpu_check.md (the table) and $OUT/gpu_check.log (everything printed) come back.
#
# Building bench/wheels here (once; about 6 MB; add `/bench/wheels/` to .git/info/exclude so it is never
# committed). deepspeed is an sdist: `pip wheel` builds a py3-none-any wheel that compiles no op. Its
# pure-python needs missing on that machine are hjson and pydantic (+ pydantic_core, a cp312 binary,
# annotated-types, typing-inspection); ninja, py-cpuinfo, msgpack, einops, psutil, tqdm, numpy are there.
# datasets (dpo_ds reads the jsonl data through it) needs dill and multiprocess besides what is there:
#   . .venv/bin/activate
#   pip wheel --no-deps deepspeed==0.19.8 -w bench/wheels
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d bench/wheels hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#       typing-inspection==0.4.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#
# Stages, each under `timeout` (the whole script gives up new work after GPU_CHECK_BUDGET_S, 590 s):
#   (env) `dpo-ds env` (python -m dpo_ds.cli.main env): the product's bug-report page on the card
#   (a) tests/model/test_logprobs.py and test_log_sum_sq.py (WPO's log sum p^2) on CUDA with TRITON_INTERPRET=0:
#       the compiled Triton kernel against fp64
#   (b) naive / chunked / triton log-probs fwd+bwd at 16384 tokens x vocab 32000 and 128256, bf16, as GB/s of
#       the nominal 3 x N x V elements and as a fraction of a measured device-to-device copy, + extra memory
#   (c) DPO steps of a ~1B random Llama, ZeRO-3, bf16 policy and reference, in each layout: shared_prompt
#       and packed on FlexAttention, then padded (the stage's budget split between them), through
#       dpo_ds/train.py in one process: real tokens/s, peak memory, MFU against 989 TFLOP/s dense bf16.
#       Skipped with a line saying why when deepspeed or datasets cannot be imported.
#   (g) the same for a Mixture-of-Experts model with TR-DPO on (gpu_check.py dpo --moe, bench/_gpu_check_moe.py): DPO steps of a
#       random Qwen3-MoE of 0.91B parameters in all, 0.18B active per token (hidden 1024, 16 layers, 32 experts
#       of width 512, top-4, vocab 32000), ZeRO-3, bf16 policy and reference, packed on FlexAttention, the
#       router's load-balancing loss on (the model's router_aux_loss_coef, logged as aux_loss/train), experts
#       on transformers' grouped_mm (asked for in config.json): real tokens/s, peak memory, first losses and
#       aux losses, MFU on the ACTIVE parameters (attention + router + top-k experts + lm_head).
#   (d) peak memory per config (bench/memory.py --gpu-short, <= 90 s): max allocated of fwd+bwd at module level
#       (no logits / fused_linear / chunked / naive, the fused_linear target), then 1-rank DPO runs of the ~1B
#       model (bf16 reference engine vs precomputed, fused_linear vs naive at 8k tokens) while its budget lasts.
#       Its training rows are skipped with a line saying why when deepspeed or datasets cannot be imported.
#       Each training row logs dpo_ds.plan's estimate beside its max allocated (bench/plan_check.py's check
#       on the device; "planned_gib" in d_memory.json).
#   (f) a long pair on the device (bench/long_context.py --gpu, <= 60 s; 100 s in the CPU smoke): the ~1B model, packed rows on
#       FlexAttention, checkpointing, fused_linear, at 8192 then 32768 tokens, then 8192 with ALST's tiled
#       MLP (parallel.tiled_mlp_tokens), while the time lasts: peak memory, tokens/s.
#       Sequence parallelism (SP 2 vs 1) needs two devices: with one, this is SP 1's side of it.
#   (e) one markdown table, printed and written to $OUT/gpu_check.md when $OUT is set ((f) prints its own)
# Nothing is downloaded: random weights, a generated word-level tokenizer, synthetic data.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=()
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=(--cpu-smoke); elif [ -n "${1:-}" ]; then
    echo "usage: bash bench/gpu_check.sh [--cpu-smoke]" >&2
    exit 2
fi
BUDGET=${GPU_CHECK_BUDGET_S:-590}
START=$SECONDS
# seconds for the next stage: what it asks for, at most what is left of the budget
cap() { local want=$1 left=$((BUDGET - (SECONDS - START))); ((left < want)) && want=$left; ((want < 5)) && want=5; echo "$want"; }

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
RES=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG=$RES/gpu_check.log
exec > >(tee "$LOG") 2>&1
echo "== gpu_check: $(date -u +%FT%TZ), python $PY, results in $RES${SMOKE:+, CPU smoke run}"
if [ ${#SMOKE[@]} -gt 0 ]; then
    echo "== CPU SMOKE RUN: tiny sizes on CPU; every figure below is a CPU smoke figure, not a GPU result"
    # before anything imports triton: the kernels run in its interpreter here (no GPU driver)
    export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

# 0. carried wheels (deepspeed & co.) into a private target dir; nothing of the machine's own install changes
if [ ${#SMOKE[@]} -gt 0 ]; then
    echo "== CPU smoke: carried wheels (if any) not installed; using the installed packages"
elif compgen -G "bench/wheels/*.whl" >/dev/null; then
    echo "== installing $(ls bench/wheels/*.whl | wc -l) carried wheels into $RES/site"
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$RES/site" bench/wheels/*.whl; then
        export PYTHONPATH="$RES/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "!! wheel install failed: (c) will be skipped if deepspeed cannot be imported"
    fi
else
    echo "== no bench/wheels/*.whl: using whatever is installed (see the header to build them)"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

timeout 60 "$PY" bench/gpu_check.py env --out "$RES/env.json"

# each stage's exit status, '<stage> <status>' a line: the report lists every non-zero one
STAGE_RC=$RES/stage_rc.txt
: >"$STAGE_RC"
stage_rc() { echo "$1 $2" >>"$STAGE_RC"; }

# (env) the product's own bug-report page on this machine: `dpo-ds env` (versions, the GPU as torch and
# DeepSpeed's accelerator see it, DeepSpeed's op status)
echo "== (env) dpo-ds env"
timeout -k 5 60 "$PY" -m dpo_ds.cli.main env >"$RES/dpo_ds_env.md" 2>"$RES/dpo_ds_env.err"
stage_rc env $?
grep -E "^\| (torch|deepspeed|GPU|GPUs|bf16 supported|DeepSpeed accelerator|NCCL) " "$RES/dpo_ds_env.md"

# (a) parity tests; conftest sets TRITON_INTERPRET only without CUDA, and 0 here keeps the compiled kernel
# (the CPU smoke run has no compiled kernel: the interpreter runs the same tests)
INTERP=0
[ ${#SMOKE[@]} -eq 0 ] || INTERP=1
echo $INTERP >"$RES/a_triton_interpret"
echo "== (a) tests/model/test_logprobs.py tests/model/test_log_sum_sq.py, TRITON_INTERPRET=$INTERP"
TRITON_INTERPRET=$INTERP timeout -k 5 "$(cap 100)" "$PY" -m pytest -q -p no:cacheprovider tests/model/test_logprobs.py \
    tests/model/test_log_sum_sq.py \
    >"$RES/a_pytest.log" 2>&1
echo $? >"$RES/a_pytest.rc"
tail -n 15 "$RES/a_pytest.log"
IMPL=()
[ "$(cat "$RES/a_pytest.rc")" = 0 ] || IMPL=(--logprob-impl chunked)  # (c) avoids a kernel that failed its tests

# (b) kernels against the copy bandwidth
echo "== (b) log-prob kernels"
timeout -k 5 "$(cap 90)" "$PY" bench/gpu_check.py kernels --out "$RES/b_kernels.json" "${SMOKE[@]}"
stage_rc b $?

# (c) DPO steps through dpo_ds; gpu_check.py stops its own run 15 s before this timeout
echo "== (c) DPO steps of a ~1B Llama through dpo_ds"
T=$(cap 210)  # three layouts, ~65 s each: 4 steps (1 untimed) apiece
timeout -k 10 "$T" "$PY" bench/gpu_check.py dpo --out "$RES/c_dpo.json" --budget-s $((T - 15)) --steps 4 --skip 1 \
    "${IMPL[@]}" "${SMOKE[@]}"
stage_rc c $?

# (g) DPO steps of an MoE through dpo_ds, router loss on, and TR-DPO's reference moving after steps 2 and 4 (its
# ZeRO-3 shards updated in place on the device, in bf16); gpu_check.py stops its run 15 s before this timeout
echo "== (g) DPO steps of a ~1B-total Qwen3-MoE through dpo_ds, TR-DPO on"
T=$(cap 80)  # one layout: 4 steps (1 untimed)
timeout -k 10 "$T" "$PY" bench/gpu_check.py dpo --moe --out "$RES/g_moe.json" --budget-s $((T - 15)) --steps 4 \
    --skip 1 --layouts packed --keys model.reference_sync_steps=2 "${IMPL[@]}" "${SMOKE[@]}"
stage_rc g $?

# (d) peak memory per config; memory.py starts no run it cannot finish 20 s before this timeout
echo "== (d) peak memory per config (bench/memory.py --gpu-short)"
# the CPU smoke's four tiny runs take 13-15 s each on a 2-core VM whose speed varies 2x from day to day: room for
# all of them there, so that a slow day is not a skipped stage
T=$(cap $((${#SMOKE[@]} ? 130 : 90)))
timeout -k 10 "$T" "$PY" bench/memory.py --gpu-short --out "$RES/d_memory.json" --budget-s $((T - 20)) \
    "${SMOKE[@]}"
stage_rc d $?

# (f) a long pair: FlexAttention training on the device, SP 1's side of bench/long_context.py
echo "== (f) long pairs on one GPU (bench/long_context.py --gpu)"
# the CPU smoke's three tiny runs took 12, 19 and ~12 s (with start-up) on a slow day of the 2-core VM, and 60 s
# left the third unstarted: room for all three there
T=$(cap $((${#SMOKE[@]} ? 100 : 60)))
timeout -k 10 "$T" "$PY" bench/long_context.py --gpu --out "$RES/f_long.json" --budget-s $((T - 10)) "${SMOKE[@]}"
stage_rc f $?

# (e) the table
echo "== (e) summary ($((SECONDS - START)) s)"
MD=()
if [ -n "${OUT:-}" ]; then MD=(--md "$OUT/gpu_check.md"); fi
"$PY" bench/gpu_check.py report --dir "$RES" "${MD[@]}" "${SMOKE[@]}"
REPORT_RC=$?
if [ -n "${OUT:-}" ]; then
    cp "$LOG" "$OUT/gpu_check.log" 2>/dev/null
    cp "$RES"/c_dpo_*.log "$OUT/" 2>/dev/null
    cp "$RES"/g_moe_*.log "$OUT/" 2>/dev/null
    cp "$RES"/f_long.json "$OUT/" 2>/dev/null
    cp "$RES"/dpo_ds_env.md "$OUT/" 2>/dev/null
fi
echo "== done in $((SECONDS - START)) s"
if [ ${#SMOKE[@]} -gt 0 ]; then
    if [ "$REPORT_RC" != 0 ]; then
        echo "== CPU smoke: FAILED (stage problems above; logs in $RES). CPU smoke figures, not GPU results."
        exit 1
    fi
    echo "== CPU smoke: every stage ran. CPU smoke figures, not GPU results."
fi
