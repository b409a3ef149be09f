"""A test-only Mixture-of-Experts causal LM whose MoE blocks run each expert as its own nn.Linear and skip
the experts no token picked (as transformers 4.x's blocks and remote-code DeepSeek models do), with routing
that sends rank 0's tokens to one expert and rank 1's to two others: under ZeRO-3 the ranks then gather
different parameters, the hang dpo_ds must never have.

    deepspeed ... tests/model/per_expert_moe.py [--in-table] train.py-args...

registers the architecture with transformers (model_type dpo_ds_per_expert_moe), adds its block to
dpo_ds's table of per-expert blocks with --in-table, and runs dpo_ds's train.py. `write_model_dir` writes a
model directory of it (config and the tiny tokenizer, no weights: model.init=random).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL_TYPE = "dpo_ds_per_expert_moe"


class PerExpertMoeConfig(LlamaConfig):
    model_type = MODEL_TYPE

    def __init__(self, num_local_experts: int = 4, **kwargs):
        self.num_local_experts = num_local_experts
        super().__init__(**kwargs)


class TestPerExpertBlock(nn.Module):
    """experts: one nn.Linear each; rank r's tokens go to experts DISJOINT[r] only (the test's routing)."""

    DISJOINT = {0: (0,), 1: (1, 2)}

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.gate = nn.Linear(h, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(config.num_local_experts))

    def forward(self, x):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        weights = torch.softmax(self.gate(x), dim=-1)
        out = torch.zeros_like(x)
        for e in self.DISJOINT[rank % 2]:  # the experts no token picked are never called
            out = out + weights[..., e : e + 1] * self.experts[e](x)
        return out


class PerExpertMoeForCausalLM(LlamaForCausalLM):
    config_class = PerExpertMoeConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = TestPerExpertBlock(config)
        self.post_init()


def register() -> None:
    AutoConfig.register(MODEL_TYPE, PerExpertMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(PerExpertMoeConfig, PerExpertMoeForCausalLM, exist_ok=True)


def write_model_dir(path: Path) -> Path:
    from dpo_ds.model.files import SHIPPED_MODELS

    tiny = SHIPPED_MODELS["tiny"]
    path.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.name != "config.json":
            shutil.copy(f, path / f.name)
    base = LlamaConfig.from_pretrained(str(tiny)).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        base.pop(key, None)
    config = PerExpertMoeConfig(num_local_experts=4, **base)
    config.architectures = ["PerExpertMoeForCausalLM"]
    config.save_pretrained(str(path))
    return path


if __name__ == "__main__":
    register()
    args = [a for a in sys.argv[1:] if a != "--in-table"]
    if len(args) < len(sys.argv) - 1:
        from dpo_ds.model import moe

        moe.PER_EXPERT_BLOCKS.append(TestPerExpertBlock.__name__)
    from dpo_ds.cli.train import exit_now, main

    exit_now(main(args))
