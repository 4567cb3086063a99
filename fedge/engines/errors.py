"""What every engine raises when it cannot run a scenario."""


class EngineError(RuntimeError):
    """An engine could not run the scenario; the message carries the tail of the relevant log."""
