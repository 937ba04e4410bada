"""The errors bdjax's modules share, kept here so that none of them imports another for its
errors alone (bdjax/options.py re-exports `OptionError` as `bdjax.options.OptionError`)."""


class OptionError(ValueError):
    """A value an edit cannot run with; the message opens with "name=value", and `name` is the
    option or request field at fault (so a program can name its own flag or field for it)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
