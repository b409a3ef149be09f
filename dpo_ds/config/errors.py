"""The one exception of the config package."""


class ConfigError(ValueError):
    """A bad config key, type or value; the message names the key."""
