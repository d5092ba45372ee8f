"""funnn: functional, differentiable neural networks on JAX."""

from funnn import core
from funnn.core import Layer

__version__ = "0.1.0"
