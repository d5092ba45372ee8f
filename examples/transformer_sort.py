"""A small transformer learns to sort digit sequences of varying length.

Input: 4 to 8 digits (0-9), padded to 8 with a pad token; target: the same digits sorted,
at the same positions. The model is an encoder built with ``serial``: token embedding
(tied to the output projection), learned positions, two pre-norm transformer blocks and a
final layer norm. One ``lengths=`` argument reaches the attention of both blocks through
``serial`` and ``tied_embedding``, so padded keys get no attention; padded positions carry a
zero target row, so they add nothing to the loss or its gradient.

The same network trains with the autodiff engine, with the hand-written backward
(``--engine manual``) and under the bfloat16 mixed-precision policy (``--precision bf16``);
each reaches >= 99% exact-sequence accuracy on 2000 held-out sequences in well under a
minute on a 2-core CPU.

    python examples/transformer_sort.py [--engine manual] [--precision bf16] [--steps 1500]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import funnn
from funnn import layers as L
from funnn import losses, precision

T, DIGITS, PAD = 8, 10, 10          # sequence length, vocabulary of digits, pad token
VOCAB = DIGITS + 1


def make_data(n: int, seed: int):
    """``ids (n, T)``, one-hot sorted targets ``(n, T, VOCAB)`` (zero rows at padding) and
    ``lengths (n,)``."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, T + 1, n)
    digits = rng.integers(0, DIGITS, (n, T))
    valid = np.arange(T) < lengths[:, None]
    ids = np.where(valid, digits, PAD)
    target = np.sort(np.where(valid, digits, DIGITS + 99), axis=1)    # padding sorts last
    onehot = (target[..., None] == np.arange(VOCAB)) & valid[..., None]
    return (jnp.asarray(ids), jnp.asarray(onehot, jnp.float32),
            jnp.asarray(lengths, jnp.int32))


def build(width: int = 64, heads: int = 4):
    body = L.serial(L.positional_embedding(T), L.transformer_block(heads, 2 * width),
                    L.transformer_block(heads, 2 * width), L.layer_norm())
    return L.tied_embedding(VOCAB, width, body)


def exact_accuracy(model, params, ids, onehot, lengths) -> float:
    pred = jnp.argmax(model.apply(params, ids, lengths=lengths), -1)
    valid = jnp.arange(T) < lengths[:, None]
    right = (pred == jnp.argmax(onehot, -1)) | ~valid
    return float(jnp.mean(jnp.all(right, axis=1)))


def train(engine: str = "autodiff", policy: str = "f32", steps: int = 1500, batch: int = 128,
          seed: int = 0, log=print) -> dict:
    model = precision.apply_policy(build(), policy)
    _, params = model.init(jax.random.key(seed), (None, T))
    loss = losses.softmax_cross_entropy
    vg = (funnn.manual if engine == "manual" else funnn.autodiff).value_and_grad(model, loss)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, steps),
                      weight_decay=1e-4)

    @jax.jit
    def step(params, opt_state, ids, onehot, lengths):
        value, grads = vg(params, ids, onehot, lengths=lengths)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    ids, onehot, lengths = make_data(steps * batch, seed + 1)
    test = make_data(2000, seed + 2)
    opt_state = opt.init(params)
    t0 = time.perf_counter()
    for i in range(steps):
        sl = slice(i * batch, (i + 1) * batch)
        params, opt_state, value = step(params, opt_state, ids[sl], onehot[sl], lengths[sl])
        if (i + 1) % 500 == 0:
            log(f"  step {i + 1}: loss {float(value):.4f}")
    seconds = time.perf_counter() - t0
    acc = exact_accuracy(model, params, *test)
    log(f"{engine} engine, precision {policy}: exact-sequence accuracy on 2000 held-out "
        f"sequences {100 * acc:.2f}% after {steps} steps ({seconds:.1f} s)")
    return {"accuracy": acc, "seconds": seconds, "params": params, "model": model}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="autodiff", choices=["autodiff", "manual"])
    p.add_argument("--precision", default="f32", choices=list(precision.POLICIES))
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args(argv)
    result = train(args.engine, args.precision, args.steps)
    assert result["accuracy"] >= 0.99, result["accuracy"]
    return result


if __name__ == "__main__":
    main()
