"""funnn: functional, differentiable neural networks on JAX.

A network is a pure function over a parameter pytree; beside every autodiff path
stands a hand-written backward pass. See README.md for the tour.
"""

import importlib

from funnn import activations, autodiff, core, gradcheck, layers, losses, manual
from funnn.compile import compiler_options, jit
from funnn.core import Layer

__version__ = "0.1.0"

__all__ = ["Layer", "compiler_options", "jit", "activations", "autodiff", "core", "gradcheck",
           "layers", "losses", "manual", "__version__"]


def __getattr__(name):
    # The tools on top (data, training, checkpoints, control flow, CLI) load on first use,
    # so `import funnn` stays light.
    if name in ("control", "data", "train", "checkpoint", "models", "cli", "bench", "parallel",
                "rundir", "numerics", "interop", "precision", "privacy", "distributed", "summary",
                "generate", "curvature", "laplace", "calibration"):
        return importlib.import_module(f"funnn.{name}")
    raise AttributeError(f"module 'funnn' has no attribute {name!r}")
