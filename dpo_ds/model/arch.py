"""What a model's own attention computes beyond causal softmax attention, read from its config, and which
layouts and attention implementations cannot reproduce it: those are refused by name before any engine.

How transformers 5.24 applies the two features its MoE causal LMs have (models/*/modeling_*.py):

    sliding window   a query at position i sees the keys at i - W < j <= i (masking_utils'
                     sliding_window_overlay), positions being the sequence's own (a packed row's restart).
                     Mixtral (and Mistral): config.sliding_window on every layer; Qwen3-MoE: on every layer
                     when use_sliding_window (its config sets sliding_window None otherwise); gpt-oss, Qwen2
                     and Qwen2-MoE: on the layers config.layer_types names "sliding_attention"; OLMoE: none.
    sinks            gpt-oss: a learned logit per head (module.sinks) added to every softmax's denominator
                     with no value, so a query's weights sum to less than one.

The model hands both to its attention function per layer (keyword arguments sliding_window and s_aux):
dpo_ds_blocks applies them from there (attention.py), in every layout. transformers' eager, sdpa and
flex_attention take the window from the masks transformers builds (padded rows: from the 2D mask; packed
rows: from the restarting position ids) and the sinks from s_aux (eager; flex_attention on a GPU only;
sdpa never). What no implementation can reproduce here is refused (check):

    the shared_prompt mask that dpo_ds builds for eager, sdpa and flex_attention (attention.block_mask):
        one mask for every layer, over row positions: no window
    sequence parallelism: DeepSpeed's Ulysses gives the core attention no mask (sdpa loses the window) and
        1/size of the heads (every head's sink is passed: the sinks would not match the heads)
    sinks under sdpa (transformers passes s_aux, sdpa drops it) and under flex_attention on CPU
        (transformers applies them through the log-sum-exp, which FlexAttention does not return on CPU)
    packed rows under eager, sdpa and flex_attention for a model whose masks ignore the position ids
        (gpt-oss: transformers then sees one sequence a row, and the segments attend to one another)
    an implementation the model's transformers class refuses to build with (OLMoE: flex_attention; the
        sink models: sdpa), here rather than after the data phase

A window no longer than a sequence can be never binds (W >= max_length: no query is W tokens past a key of
its own sequence), so it refuses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpo_ds.config import ConfigError

# model types whose transformers 5.24 attention passes learned sinks (s_aux=module.sinks): gpt-oss (tested,
# tests/model/test_moe_attention.py) and the others `grep -l "s_aux=" transformers/models/*/modeling_*.py`
# finds, refused alike where sinks cannot run
SINK_MODEL_TYPES = (
    "gpt_oss",
    "granite_swa",
    "granitemoe_swa",
    "flint",
    "deepseek_v4",
    "hy_v4",
    "mimo_v2_flash",
)
# model types whose transformers 5.24 model builds its masks without the position ids (its mask_kwargs
# lack them), so that eager, sdpa and flex_attention cannot tell a packed row's sequences apart
UNPACKED_MASK_MODEL_TYPES = ("gpt_oss", "afmoe")
# the attention implementations that need no mask to follow a row's segments and the window: ours
# (attention.py: the spans, the row) and the flash kernels (the position ids; the window as window_size)
OWN_SEGMENTS = ("dpo_ds_blocks", "flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class AttentionFeatures:
    """What a model's attention adds to causal softmax attention, and what its transformers class runs."""

    model_type: str
    window: int | None  # W: a query sees the W latest positions of its sequence, itself included
    window_layers: tuple[int, ...]  # the layers that have the window
    sinks: bool  # a learned logit per head in every softmax's denominator
    model_class: str = ""  # the transformers causal-LM class the config builds
    unsupported: tuple[str, ...] = ()  # attention implementations that class refuses to build with
    packed_by_position_ids: bool = True  # whether its masks find a packed row's sequences (module docstring)

    def window_binds(self, max_length: int) -> bool:
        """Whether the window can cut a sequence of up to max_length tokens."""
        return self.window is not None and self.window < max_length

    def check(self, layout, max_length: int, on_cpu: bool) -> None:
        """Refuse (ConfigError) a layout (data.layout.Layout: its name, segmented, own_mask, attn, sp_size)
        whose attention would drop the window or the sinks, or that the model cannot be built for."""
        why = self.refusal(layout, max_length, on_cpu)
        if why is not None:
            raise ConfigError(why)

    def refusal(self, layout, max_length: int, on_cpu: bool) -> str | None:
        """The message naming the model type, the feature, the layout and the attention implementation, or None."""
        attn, sp = layout.attn, layout.sp_size
        impl = attn or "transformers' default"
        where = f"{self.model_type} with data.layout={layout.name}, model.attn_implementation={impl}"
        key = "config key 'model.attn_implementation'"
        sinks = "attention sinks (a learned logit per head in every softmax)"
        if self.sinks and sp > 1:
            return (
                f"config key 'parallel.sequence_parallel_size': {where}: its {sinks} cannot run under "
                f"sequence parallelism ({sp}): each rank attends with a slice of the heads and dpo_ds does not "
                f"slice the sinks with them; use parallel.sequence_parallel_size=1"
            )
        if self.sinks and attn == "sdpa":
            return f"{key}: {where}: sdpa has no place for its {sinks}; use eager, dpo_ds_blocks or auto"
        if self.sinks and attn == "flex_attention" and on_cpu:
            return (
                f"{key}: {where}: transformers applies its {sinks} to flex_attention through the log-sum-exp, "
                f"which FlexAttention does not return on CPU; use dpo_ds_blocks (auto on CPU) or eager"
            )
        if attn in self.unsupported:
            return f"{key}: {where}: transformers does not build {self.model_class} with {attn}; use dpo_ds_blocks"
        if (
            layout.segmented
            and not layout.own_mask
            and not self.packed_by_position_ids
            and attn not in OWN_SEGMENTS
        ):
            return (
                f"{key}: {where}: {self.model_class} builds its attention masks without the position ids, so "
                f"under {impl} a packed row's sequences would attend to one another; use dpo_ds_blocks (auto on CPU)"
            )
        if not self.window_binds(max_length):
            return None
        window = f"its {self.describe_window()}, shorter than max_length={max_length}, would be dropped"
        if layout.own_mask and attn != "dpo_ds_blocks":
            mask = "FlexAttention block mask" if attn == "flex_attention" else "dense mask"
            return (
                f"{key}: {where}: {window}: the {layout.name} {mask} dpo_ds builds has none (one mask for every "
                f"layer, over row positions); use model.attn_implementation=dpo_ds_blocks, or data.layout=packed"
            )
        if sp > 1 and attn not in OWN_SEGMENTS:
            return (
                f"{key}: {where}: {window} under parallel.sequence_parallel_size={sp}: DeepSpeed's Ulysses gives "
                f"{impl} no mask (plain causal); use model.attn_implementation=dpo_ds_blocks, which applies the "
                f"window itself"
            )
        return None

    def describe_window(self) -> str:
        return f"sliding window of {self.window} tokens (layers {list(self.window_layers)})"


def attention_features(config) -> AttentionFeatures:
    """A transformers config's attention features (its text config's, for a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or type(text).__name__
    window = getattr(text, "sliding_window", None)
    layers: tuple[int, ...] = ()
    if isinstance(window, int) and window > 0:  # Qwen2-MoE keeps 0 when use_sliding_window is off
        types = getattr(text, "layer_types", None)
        n = text.num_hidden_layers
        layers = (
            tuple(i for i, t in enumerate(types) if t == "sliding_attention") if types else tuple(range(n))
        )
    cls = _causal_lm_class(config)
    flags = (("sdpa", "_supports_sdpa"), ("flex_attention", "_supports_flex_attn"))
    return AttentionFeatures(
        model_type=model_type,
        window=window if layers else None,
        window_layers=layers,
        sinks=model_type in SINK_MODEL_TYPES,
        model_class=cls.__name__ if cls is not None else type(config).__name__,
        unsupported=tuple(impl for impl, flag in flags if cls is not None and not getattr(cls, flag, True)),
        packed_by_position_ids=model_type not in UNPACKED_MASK_MODEL_TYPES,
    )


def _causal_lm_class(config):
    """The class AutoModelForCausalLM builds for this config (not built), or None."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def model_attention_features(name_or_path: str) -> AttentionFeatures | None:
    """The features of model.name_or_path's config.json, or None when it cannot be read here (the run's own
    check of the model directory says why, before any engine)."""
    from dpo_ds.model.files import load_config, resolve_model_dir

    try:
        return attention_features(load_config(resolve_model_dir(name_or_path)))
    except (OSError, ValueError):  # ModelError is a ValueError
        return None
