"""The one exception of the config package, and the hint its messages give for a mistyped name."""


class ConfigError(ValueError):
    """A bad config key, type or value; the message names the key."""


def did_you_mean(word: str, names) -> str:
    """' (did you mean NAME?)' for the closest of `names` to a mistyped `word`, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(names), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
