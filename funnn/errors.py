"""funnn's error types and layer scopes.

Every error funnn raises for bad input is a :class:`FunnnError` (and a ``ValueError`` or
``TypeError``, so ordinary handlers catch it): one line, naming the place by its layer path,
what was expected and what came. :func:`layer_scope` grows the path as an error travels up
through combinators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

__all__ = ["FunnnError", "ShapeError", "ConfigError", "DTypeError", "KeyMissingError",
           "StateError", "DataError", "CheckpointError", "layer_scope"]


class FunnnError(Exception):
    """Base of funnn's errors: a message and the path of the layer that raised it.

    The path grows as the error travels up through combinators, so the final
    message reads ``serial[2] dense(10): expected input features 30, got 20 ...``.
    """

    def __init__(self, message: str, path: Sequence[str] = ()):
        self.message = message
        self.path = tuple(path)
        super().__init__(self._text())

    def _text(self) -> str:
        where = " ".join(self.path)
        return f"{where}: {self.message}" if where else self.message

    def __str__(self) -> str:
        return self._text()

    def under(self, prefix: str) -> FunnnError:
        """The same error with ``prefix`` prepended to its layer path."""
        err = type(self).__new__(type(self))
        FunnnError.__init__(err, self.message, (prefix, *self.path))
        return err


class ShapeError(FunnnError, ValueError):
    """An input, parameter or init shape does not fit the layer."""


class ConfigError(FunnnError, ValueError):
    """A hyper-parameter or name is invalid (unknown activation, stride < 1, ...)."""


class DTypeError(FunnnError, TypeError):
    """An array has a dtype the layer cannot use."""


class KeyMissingError(FunnnError, ValueError):
    """A layer needs a PRNG key (dropout in training mode) and got none."""


class StateError(FunnnError, ValueError):
    """A stateful layer's state is missing or does not match its shape."""


class DataError(FunnnError, ValueError):
    """A data file or directory is missing, corrupt or inconsistent."""


class CheckpointError(FunnnError, ValueError):
    """A checkpoint is missing, truncated, tampered with or does not match."""


@contextlib.contextmanager
def layer_scope(name: str) -> Iterator[None]:
    """Prefix ``name`` to the path of any funnn error raised inside the block.

    Shape checks run while tracing, so under ``jit`` this costs nothing per step.
    """
    try:
        yield
    except FunnnError as err:
        raise err.under(name) from None
