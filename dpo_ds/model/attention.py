"""Block attention: attention computed per segment, for packed and shared-prompt rows without padding.

A dense (T x T) mask makes a packed row pay attention between every two of its tokens, masked or not,
and forces every row of a micro-batch to one length (padding again). Block attention computes only what
a row's layout allows, straight from the collators' spans:

    packed segment        one causal attention over the segment
    shared-prompt block   [prompt | response 1] causal; each further response k attends to the prompt
                          and causally to itself (never to another response): one attention each

so a micro-batch can be one row holding every segment, with no padding, at the cost of the segments'
own attention. It is a transformers attention implementation (model.attn_implementation=dpo_ds_blocks,
the default on CPU for packed and shared_prompt rows); the spans reach it as a forward keyword argument
and transformers builds no mask for such a forward. Without spans (generation) it is plain SDPA with
transformers' usual mask. On a GPU FlexAttention does what it does with a block mask.

Spans, per row: a list of (start, prompt_len, [(response_start, response_len), ...]); a packed
segment is (start, length, []). Tokens no span covers (tail padding) get a zero output.

The model's own attention features (model/arch.py) arrive per layer as keyword arguments and are applied
here in every case: a sliding window (sliding_window: Mixtral, Qwen3-MoE, gpt-oss's sliding layers) counts
in each sequence's own positions (a shared-prompt response's continue from its prompt's end); gpt-oss's
sinks (s_aux) join every softmax's denominator, so a segment's attention is then computed from explicit
scores. The dense and FlexAttention masks below carry no window: arch.py refuses them for a model whose
window can bind.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

NAME = "dpo_ds_blocks"
# the most tokens a row's dense (T x T) mask may have (a shared-prompt row on sdpa/eager)
DENSE_MASK_MAX_TOKENS = 8192
SPANS_KWARG = "dpo_spans"


def block_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, H, T, D), key/value (B, H_kv, T, D) -> ((B, T, H, D), None), as transformers expects.

    The model's own attention features come per layer as keyword arguments (model/arch.py): sliding_window
    (a query sees the keys of its sequence at most W - 1 positions back) and s_aux (gpt-oss's sinks: a
    logit per head in every softmax's denominator); both are applied here, in a segment's own positions."""
    spans = kwargs.pop(SPANS_KWARG, None)
    window, sinks = kwargs.get("sliding_window"), kwargs.get("s_aux")
    if spans is None:
        if sinks is None and (window is None or attention_mask is not None):
            # no layout (generation with left-padded prompts and a cache; padded rows): plain SDPA on
            # transformers' own mask, which it builds for this implementation as for sdpa (register), window
            # included
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        _refuse_unapplied(module, kwargs)
        return _unsegmented(query, key, value, attention_mask, scaling, window, sinks), None
    _refuse_unapplied(module, kwargs)
    b, h = query.shape[:2]
    key, value = _repeat_kv(key, value, h)
    rows = [
        _row(query[r : r + 1], key[r : r + 1], value[r : r + 1], spans[r], scaling, window, sinks)
        for r in range(b)
    ]
    out = torch.cat(rows, dim=0)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def _row(q, k, v, spans, scaling, window, sinks) -> torch.Tensor:
    """One row's attention (1, H, T, D), segment by segment; tokens no span covers get zeros."""
    _, h, t, d = q.shape
    pieces, at = [], 0
    for start, p, responses in spans:
        if start > at:
            pieces.append(q.new_zeros(1, h, start - at, d))
        first = responses[0][1] if responses else 0
        end = start + p + first
        # the prompt and the response that follows it (or a packed segment): causal, positions 0..
        pos = torch.arange(end - start, device=q.device)
        part = slice(start, end)
        pieces.append(_attend(q[:, :, part], k[:, :, part], v[:, :, part], pos, pos, scaling, window, sinks))
        for rs, rl in responses[1:]:
            # a further response: every prompt key, and its own keys causally (L x (P + L)); its positions
            # continue from the prompt's end, as if it followed the prompt alone
            keys = torch.cat([k[:, :, start : start + p], k[:, :, rs : rs + rl]], dim=2)
            vals = torch.cat([v[:, :, start : start + p], v[:, :, rs : rs + rl]], dim=2)
            q_pos = torch.arange(p, p + rl, device=q.device)
            k_pos = torch.cat([torch.arange(p, device=q.device), q_pos])
            pieces.append(_attend(q[:, :, rs : rs + rl], keys, vals, q_pos, k_pos, scaling, window, sinks))
        at = (responses[-1][0] + responses[-1][1]) if len(responses) > 1 else end
    if at < t:
        pieces.append(q.new_zeros(1, h, t - at, d))
    return torch.cat(pieces, dim=2)


def _attend(q, k, v, q_pos, k_pos, scaling, window, sinks) -> torch.Tensor:
    """Queries (1, H, L, D) at positions q_pos (L,) over keys (1, H, S, D) at k_pos (S,): causal in those
    positions, and within the window when the layer has one (i - W < j <= i: transformers'
    sliding_window_overlay)."""
    if sinks is None and q_pos is k_pos and (window is None or len(q_pos) <= window):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling
        )  # the window never binds
    allowed = k_pos[None, :] <= q_pos[:, None]  # (L, S)
    if window is not None:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
    return _softmax_attention(q, k, v, allowed, scaling, sinks)


def _unsegmented(query, key, value, attention_mask, scaling, window, sinks) -> torch.Tensor:
    """Whole rows (B, H, Q, D) with transformers' mask (padded rows), or with none: transformers skipped a
    plain causal one, or DeepSpeed's Ulysses dropped it (sequence parallelism: whole right-padded rows, where
    the window is applied here). Returns (B, Q, H, D)."""
    key, value = _repeat_kv(key, value, query.shape[1])
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :k_len]
        allowed = mask if mask.dtype == torch.bool else mask == 0  # (B, 1, Q, K), or additive
    else:  # sdpa's is_causal (top-left) where Q > 1, every key for one query
        q_pos = torch.arange(q_len, device=query.device)
        k_pos = torch.arange(k_len, device=query.device)
        allowed = k_pos[None, :] <= (q_pos[:, None] if q_len > 1 else k_len)
        if window is not None and q_len == k_len:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
    return _softmax_attention(query, key, value, allowed, scaling, sinks).transpose(1, 2).contiguous()


def _softmax_attention(q, k, v, allowed, scaling, sinks) -> torch.Tensor:
    """softmax(q k^T * scale) v over the allowed keys; with sinks (H,), each head's sink logit joins every
    softmax's denominator and brings no value (gpt-oss's eager_attention_forward)."""
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, L, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)  # (B, H, L, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]  # the sink's share dropped
    return torch.matmul(probs.to(v.dtype), v)


def _repeat_kv(key, value, heads: int):
    """Grouped-query attention: every query head gets its key/value head."""
    rep = heads // key.shape[1]
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    return key, value


def _refuse_unapplied(module, kwargs) -> None:
    """Attention features this implementation does not apply: an error, never a silent difference."""
    for name in ("softcap", "position_bias"):
        if kwargs.get(name) is not None:
            model = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
            raise ValueError(
                f"{model}: its attention passes {name}, which model.attn_implementation={NAME} does not apply; "
                f"use eager or sdpa"
            )


def allowed(block_q, branch_q, pos_q, block_k, branch_k, pos_k):
    """The shared-prompt rule (data/shared_prompt.py), on broadcasting tensors: a query may attend to a
    key of its own block, causally, on the prompt or on the query's own response. The dense mask and the
    FlexAttention mask_mod both call this; block_attention computes the same from the spans."""
    return (
        (block_q == block_k) & (block_k >= 0) & (pos_k <= pos_q) & ((branch_k == 0) | (branch_k == branch_q))
    )


def block_mask(block_ids: torch.Tensor, branch_ids: torch.Tensor, flex: bool, dtype: torch.dtype):
    """The attention of shared-prompt blocks: a FlexAttention BlockMask, which computes only the blocks
    that are needed, or a dense (rows, 1, T, T) additive mask (0 where allowed)."""
    rows, t = block_ids.shape
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return allowed(block_ids[b, q], branch_ids[b, q], q, block_ids[b, k], branch_ids[b, k], k)

        return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=t, KV_LEN=t, device=block_ids.device)
    if t > DENSE_MASK_MAX_TOKENS:
        raise ValueError(
            f"a row of {t} tokens needs a dense {t}x{t} attention mask per row; rows over "
            f"{DENSE_MASK_MAX_TOKENS} tokens need model.attn_implementation=flex_attention (GPU), or lower "
            f"data.row_tokens / data.max_tokens_per_micro_batch"
        )
    pos = torch.arange(t, device=block_ids.device)
    ok = allowed(
        block_ids[:, :, None],
        branch_ids[:, :, None],
        pos[None, :, None],
        block_ids[:, None, :],
        branch_ids[:, None, :],
        pos[None, None, :],
    )  # fmt: skip  (rows, T, T): query along dim 1, key along dim 2
    mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)
    return mask[:, None]


def attention_inputs(impl: str | None, attention_mask, block_ids, branch_ids, spans, dtype, device):
    """(attention_mask, extra forward kwargs) for a micro-batch under the attention implementation
    `impl`: the layout's rule applied here, the model wrapper only passes them on. dpo_ds_blocks with
    spans: no mask at all (block_attention reads the spans); shared-prompt ids: their block mask;
    otherwise the micro-batch's own mask (padded rows) or None (packed rows: transformers masks them by
    their restarting position ids)."""
    if impl == NAME and spans is not None:
        return placeholder_mask(device), {SPANS_KWARG: spans}
    if block_ids is not None:
        return block_mask(block_ids, branch_ids, impl == "flex_attention", dtype), {}
    return attention_mask, {}


def register() -> None:
    """Make `dpo_ds_blocks` a transformers attention implementation (idempotent), whose mask, when
    transformers builds one (generation), is sdpa's; a training forward passes a placeholder 4D mask,
    which transformers hands on untouched, so no (T x T) mask is ever built for packed rows."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME in ALL_ATTENTION_FUNCTIONS:  # registered (and perhaps wrapped by sequence parallelism): kept
        return
    AttentionInterface.register(NAME, block_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def placeholder_mask(device) -> torch.Tensor:
    """A 4D mask transformers passes through as is (block_attention ignores it when it has spans)."""
    return torch.zeros((1, 1, 0, 0), dtype=torch.bool, device=device)


def flex_on_cpu() -> None:
    """Let model.attn_implementation=flex_attention train on CPU (idempotent; a GPU's calls unchanged).

    transformers runs FlexAttention through torch.compile, whose CPU code has a forward but no backward,
    and torch's FlexAttention refuses CPU inputs that need a gradient. For CPU tensors this routes
    transformers' own flex_attention_forward (its score_mod, GQA handling and the layout's BlockMask, as
    on a GPU) to torch's eager FlexAttention with that one refusal lifted: the same operator and mask,
    through torch's reference implementation of its forward and backward (the scores materialized per
    head: T x T floats, a test-sized path; dpo_ds_blocks is the CPU default). What a GPU adds is the
    fused kernel. tests/test_flex_cpu.py checks torch still refuses, so this goes when torch learns it."""
    import torch.nn.attention.flex_attention as torch_flex
    import transformers.integrations.flex_attention as hf_flex

    compiled = hf_flex.compile_friendly_flex_attention
    if getattr(compiled, "dpo_ds_cpu", False):
        return

    def flex_attention(query, key, value, training=False, **kwargs):
        if query.device.type != "cpu" or not torch.is_grad_enabled():
            return compiled(query, key, value, training=training, **kwargs)
        check = torch_flex._validate_device
        torch_flex._validate_device = _no_device_check
        try:
            with warnings.catch_warnings():  # "called without torch.compile": on purpose (layout.choose says)
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return torch_flex.flex_attention(query, key, value, **kwargs)
        finally:
            torch_flex._validate_device = check

    flex_attention.dpo_ds_cpu = True
    hf_flex.compile_friendly_flex_attention = flex_attention


def _no_device_check(query, key, value) -> None:
    return None
