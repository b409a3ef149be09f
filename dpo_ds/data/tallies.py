"""What tokenization counts beyond the ids (Tokenization.tallies), by name, and the log lines said
of them: once, of the total over every rank's share (data/cache.py sums them), never once per rank."""

from __future__ import annotations

# how a prompt was truncated (Tokenization.cuts); a conversation may count under two of these
CUT_TOKENS, CUT_TURNS, CUT_TEXT, CUT_SYSTEM = "tokens", "turns", "text", "system"
CUT_DESCRIPTIONS = {
    CUT_TOKENS: "plain-text prompts cut to their tokens' start or end",
    CUT_TURNS: "conversations lost whole earlier exchanges",
    CUT_TEXT: "conversations had their earliest user message's text cut",
    CUT_SYSTEM: "conversations had their system message's text cut too",
}
# what else tokenization counts (Tokenization.tallies, beside the CUT_* kinds)
CUT_RESPONSES = "responses"  # responses cut to the room the prompt left under max_length
IDENTICAL_IDS = "identical_ids"  # examples whose responses have equal ids as trained on (no preference left)
BOUNDARY_SPLITS = "boundary_splits"  # responses tokenized apart from the prompt (Tokenization._chat_response)
# the truncations a data report shows, by kind: how prompts were cut, then responses cut
TRUNCATION_KINDS = (CUT_TOKENS, CUT_TURNS, CUT_TEXT, CUT_SYSTEM, CUT_RESPONSES)


def summary_lines(tallies, max_prompt_length: int, max_length: int) -> list[str]:
    """Log lines of what tokenization did beyond the plain rules (Tokenization.tallies, or their sum
    over ranks); nothing when it did nothing."""
    lines = []
    if tallies.get(BOUNDARY_SPLITS):
        lines.append(
            f"{tallies[BOUNDARY_SPLITS]} responses begin with characters that merge with the end of the "
            f"generation prompt when tokenized together; they are tokenized apart from it, as at generation"
        )
    cuts = {k: tallies[k] for k in sorted(CUT_DESCRIPTIONS) if tallies.get(k)}
    if cuts:
        how = ", ".join(f"{n} {CUT_DESCRIPTIONS[k]}" for k, n in cuts.items())
        lines.append(f"prompts over max_prompt_length={max_prompt_length} were truncated: {how}")
    if tallies.get(CUT_RESPONSES):
        lines.append(
            f"{tallies[CUT_RESPONSES]} responses were cut to the room their prompt left under "
            f"max_length={max_length} (a cut response loses its end, EOS included)"
        )
    if tallies.get(IDENTICAL_IDS):
        lines.append(
            f"{tallies[IDENTICAL_IDS]} examples have responses with the same ids as trained on (identical "
            f"texts, or cut to the same start): they carry no preference"
        )
    return lines
