"""What every engine raises when it cannot run a scenario, and the reply a failing client gives."""

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode


class EngineError(RuntimeError):
    """An engine could not run the scenario; the message carries the tail of the relevant log."""


def exception_reply(msg: Message, ex: Exception) -> Message:
    """The error reply of a client whose ClientApp (or one of its mods) raised ``ex``, as the
    in-process grids give it (a real SuperNode sends the same code and reason)."""
    reason = f"{type(ex).__name__}: {ex}"
    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
