#!/usr/bin/env bash
# The wheel is the product: build it, install it (torch pinned first) into a fresh venv, and from a
# directory outside the repository use it as a user would: env, recipes, plan on every recipe, prepare
# with its data report, SFT then DPO on the shipped demo with `dpo-ds train` (2 CPU ranks through
# DeepSpeed's launcher), the same entry under torchrun, export, plot without its extra, and bad inputs
# that must get their named messages. Exit 1 on the first check that fails.
#   bash scripts/wheel_check.sh            # ~5 min on 2 cores; CI runs it once
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/dpo_ds_wheel.XXXXXX)}
PY=${PYTHON:-python3}
t0=$SECONDS
step() { echo "== wheel_check: $* ($((SECONDS - t0)) s)"; }
fail() { echo "== wheel_check: FAILED: $*" >&2; exit 1; }
# `expect_error "what" "text the message must hold" cmd...`: the command exits non-zero, without a traceback
expect_error() {
  local what=$1 want=$2; shift 2
  local out
  if out=$("$@" 2>&1); then fail "$what: exited 0"; fi
  grep -q "Traceback" <<<"$out" && fail "$what: a traceback instead of a message:"$'\n'"$out"
  grep -qF -- "$want" <<<"$out" || fail "$what: the message does not say '$want':"$'\n'"$out"
  echo "   $what -> $(grep -F -- "$want" <<<"$out" | head -1 | cut -c1-160)"
}

# a port nobody listens on, for each launch (several on one machine collide on DeepSpeed's 29500)
port() { python -c 'from dpo_ds.dist.launcher import free_port; print(free_port())'; }

step "build the wheel"
rm -rf "$WORK/wheel" && mkdir -p "$WORK/wheel"
(cd "$ROOT" && "$PY" -m pip wheel -q --no-deps . -w "$WORK/wheel")
WHEEL=$(ls "$WORK"/wheel/dpo_ds-*.whl)

step "install it into a fresh venv: torch pinned first, then the wheel"
"$PY" -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -c "$ROOT/scripts/constraints.txt" "$WHEEL"

USE=$WORK/use  # a user's directory: no repository in sight
rm -rf "$USE" && mkdir -p "$USE" && cd "$USE"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
python -c "import dpo_ds, sys; p = dpo_ds.__file__; sys.exit(0 if '$ROOT' not in p else f'imported from the repository: {p}')"

step "dpo-ds env"
dpo-ds env | tee env.md | head -20
grep -q "| deepspeed |" env.md && grep -q "## DeepSpeed ops" env.md || fail "dpo-ds env lacks its sections"

step "dpo-ds recipes; cp one out"
dpo-ds recipes
dpo-ds recipes cp demo_sft my_sft.yaml
cmp my_sft.yaml "$(python -c 'from dpo_ds.config.shipped import RECIPES; print(RECIPES)')/demo_sft.yaml"

step "dpo-ds plan on every shipped recipe"
for name in $(python -c 'from dpo_ds.config.shipped import recipe_names; print(" ".join(recipe_names()))'); do
  cmd=$(python -c "from dpo_ds.config.shipped import RECIPES, comment_field; print(comment_field((RECIPES / '$name.yaml').read_text(), 'plan'))")
  if [ -n "$cmd" ]; then out=$($cmd); else out=$(dpo-ds plan --ds zero3 --config "$name" --gpus 2 --cpu-mem 24); fi
  echo "   $name: $(grep '^estimate:' <<<"$out")"
done

step "dpo-ds prepare, with its data report"
dpo-ds prepare --help >/dev/null
dpo-ds prepare --config demo_dpo | tee prepare.log | tail -25

SFT=(n_examples=2560 eval_every=1000000 n_eval_examples=128 log_every=5)
DPO=(n_examples=640 eval_every=320 n_eval_examples=128 log_every=5 eval.n_checked=64)
step "dpo-ds train --gpus 2 --ds zero3: SFT on the shipped demo"
dpo-ds train --gpus 2 --master-port "$(port)" \
  --ds zero3 --config my_sft.yaml run_dir=runs/demo-sft "${SFT[@]}"
test -f runs/demo-sft/LATEST/policy.pt || fail "no runs/demo-sft/LATEST/policy.pt"

step "dpo-ds train --gpus 2 --ds zero3: DPO from it"
dpo-ds train --gpus 2 --master-port "$(port)" \
  --ds zero3 --config demo_dpo run_dir=runs/demo-dpo model.archive=runs/demo-sft/LATEST/policy.pt "${DPO[@]}"
test -f runs/demo-dpo/LATEST/policy.pt || fail "no runs/demo-dpo/LATEST/policy.pt"
ls runs/demo-dpo

step "the same entry under torchrun: dpo-ds train is a rank there (no second launcher), and -m dpo_ds.train"
torchrun --nproc_per_node 2 --master-port "$(port)" \
  "$(command -v dpo-ds)" train --gpus 2 --ds zero2 model.name_or_path=tiny run_dir=runs/torchrun \
  batch_size=16 eval_batch_size=16 n_eval_examples=32 max_length=16 max_prompt_length=8 n_examples=64 loss=sft
test -f runs/torchrun/LATEST/policy.pt || fail "torchrun: no LATEST/policy.pt"
torchrun --nproc_per_node 2 --master-port "$(port)" \
  -m dpo_ds.train --ds zero3 model.name_or_path=tiny run_dir=runs/torchrun-m \
  batch_size=16 eval_batch_size=16 n_eval_examples=32 max_length=16 max_prompt_length=8 n_examples=64 loss=sft
test -f runs/torchrun-m/LATEST/policy.pt || fail "torchrun -m dpo_ds.train: no LATEST/policy.pt"

step "dpo-ds export of the DPO run"
dpo-ds export runs/demo-dpo exported
python - <<'EOF'
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("exported")
saved = torch.load("runs/demo-dpo/LATEST/policy.pt", map_location="cpu", weights_only=True)["state"]
for name, tensor in model.state_dict().items():
    if name in saved:
        assert torch.equal(tensor, saved[name].to(tensor.dtype)), name
print(f"   exported model loads with transformers: {sum(p.numel() for p in model.parameters())} parameters, weights equal policy.pt's")
EOF

step "bad inputs get named messages"
expect_error "plot without its extra" "pip install 'dpo_ds[plot]'" dpo-ds plot runs/demo-dpo
expect_error "--ds a name that is not shipped" "did you mean zero3" dpo-ds plan --ds zero4 --gpus 1 --gpu-mem 24
expect_error "a TRL name" "learning_rate" python -m dpo_ds.train learning_rate=1e-6
expect_error "a mistyped data set" "ultrafeedback" python -m dpo_ds.train "datasets=[ultrafedback]"
expect_error "lr=inf" "lr" python -m dpo_ds.train lr=inf
expect_error "export of a dir without LATEST" "LATEST" dpo-ds export runs exported2

step "all checks passed in $((SECONDS - t0)) s"
