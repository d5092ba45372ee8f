"""The gradient engines by name: the one place a string picks an engine.

``"autodiff"`` differentiates ``apply`` with ``jax.value_and_grad``; ``"manual"`` runs
the hand-written backward; ``"bridge"`` is autodiff through the hand-written backward as
a ``custom_vjp`` rule. All three share one signature
(``value_and_grad(model, loss, train=...)``). ``clips_by_rules`` says whether an engine
clips per-example gradients from the layers' norm rules (ghost clipping, the manual
engine) or by ``vmap(jax.grad)`` over single examples (the others).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from funnn import autodiff, manual
from funnn.core import ConfigError

__all__ = ["Engine", "ENGINES", "get", "names"]


@dataclasses.dataclass(frozen=True)
class Engine:
    """A gradient engine: its name, ``value_and_grad(model, loss, **kw)``, whether it needs
    the loss's hand-written ``.grad`` and how DP clips."""

    name: str
    value_and_grad: Callable
    hand_written: bool = False      # runs the layers' backward and the loss's .grad
    clips_by_rules: bool = False


def _bridge(model, loss, **kw):
    return autodiff.value_and_grad(manual.bridge(model), loss, **kw)


ENGINES = {e.name: e for e in (
    Engine("autodiff", autodiff.value_and_grad),
    Engine("manual", manual.value_and_grad, hand_written=True, clips_by_rules=True),
    Engine("bridge", _bridge),
)}


def names() -> tuple[str, ...]:
    """The engine names, in the order the CLI lists them."""
    return tuple(ENGINES)


def get(name: str, where: str = "fit") -> Engine:
    """The :class:`Engine` called ``name``; an unknown name is a ConfigError listing them."""
    if isinstance(name, str) and name in ENGINES:
        return ENGINES[name]
    raise ConfigError(f"unknown engine {name!r}; valid: {', '.join(ENGINES)}", (where,))
