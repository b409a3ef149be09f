"""The only layer that calls DeepSpeed: the DeepSpeed JSON's resolution, building the two engines, the
train step's surface, sequence parallelism (Ulysses), gathering for generation, checkpoint I/O.

Policy: `deepspeed.initialize` with an optimizer; its ZeRO stage, offload and precision come from the
user's DeepSpeed JSON, with "auto" fields filled from the dpo_ds config (and explicit values that
contradict the config rejected). Reference: a second, inference-only engine (no optimizer) built
from a config derived from the policy's: its own dtype, ZeRO-3 with optional CPU parameter offload
when the policy is ZeRO-3, plain (stage 0) otherwise -- a frozen model has no optimizer state or
gradients to partition, so below stage 3 ZeRO buys it nothing.
"""
