"""A small convolutional network on the shipped 8x8 digits, trained by both gradient engines.

What it shows:

1. The network ``conv 3x3 (16) -> ReLU -> max-pool 2 -> conv 3x3 (32) -> ReLU -> max-pool 2
   -> flatten -> dense 10`` on the digit images ``(n, 8, 8, 1)`` (softmax cross-entropy,
   Adam with cosine decay), trained with ``funnn.train.fit`` twice, from the same initial
   parameters and the same key (so the same shuffles): once with ``engine="autodiff"``
   (``jax.grad`` of ``apply``) and once with ``engine="manual"`` (the layers' hand-written
   backward passes: the convolution's two transposes, max-pool's arg-max routing, the
   delta rule of the dense layer). The per-epoch test accuracy of each is printed.
2. A variant with batch-norm and dropout, ``conv (no bias) -> batch_norm -> ReLU ->
   max-pool`` twice, then ``flatten -> dropout(0.25) -> dense 10``, trained with the manual
   engine. ``fit`` threads the batch-norm running statistics (an explicit state pytree)
   through every step and evaluates with them; dropout draws its masks from the key.
3. ``gradcheck.compare`` of that variant in training mode (batch statistics, a fixed
   dropout key) on a few examples in float64: manual, autodiff and central finite
   differences, leaf by leaf.

What it checks (the assertions at the end of :func:`main`):

- the two engines' trajectories agree: per-epoch train losses to a relative 1e-4 in
  float32 (1e-9 with ``dtype="float64"``). The forward passes are the same; the backward
  passes differ only in rounding, which Adam carries through the run (observed gaps over
  12 epochs: 2e-7 to 6e-6 over four seeds, 2.4e-7 for the default seed);
- each engine's final test accuracy is at least ``min_accuracy`` (95% in the full run);
- the batch-norm/dropout model reaches ``min_accuracy`` too, and its running statistics
  moved away from their initial mean 0 and variance 1;
- the gradient check passes (engines to 1e-10, finite differences to 1e-6).

Run: ``python examples/cnn_digits.py`` (about 25 s on 2 idle CPU cores, most of it compiling).
"""

import time

import jax

jax.config.update("jax_enable_x64", True)     # for the float64 gradient check; training is float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from funnn import data, gradcheck, losses, train  # noqa: E402
from funnn import layers as L  # noqa: E402

LOSS = losses.softmax_cross_entropy
IN_SHAPE = (None, 8, 8, 1)


def cnn(channels=(16, 32), dtype=jnp.float32):
    """conv 3x3 -> ReLU -> max-pool 2 -> conv 3x3 -> ReLU -> max-pool 2 -> flatten -> dense 10.

    Shapes: (n, 8, 8, 1) -> (n, 8, 8, c1) -> (n, 4, 4, c1) -> (n, 4, 4, c2) -> (n, 2, 2, c2)
    -> (n, 4 c2) -> logits (n, 10).
    """
    c1, c2 = channels
    conv = lambda c: L.conv2d(c, (3, 3), padding="SAME", w_init="he_normal", dtype=dtype)
    return L.serial(conv(c1), L.activation("relu"), L.max_pool((2, 2)),
                    conv(c2), L.activation("relu"), L.max_pool((2, 2)),
                    L.flatten(), L.dense(10, dtype=dtype))


def cnn_bn(channels=(16, 32), rate=0.25, dtype=jnp.float32):
    """The same CNN with batch-norm after each convolution and dropout before the last dense.

    The convolutions have no bias: batch-norm's ``beta`` plays its part.
    """
    c1, c2 = channels
    block = lambda c: (L.conv2d(c, (3, 3), padding="SAME", use_bias=False, w_init="he_normal",
                                dtype=dtype),
                       L.batch_norm(dtype=dtype), L.activation("relu"), L.max_pool((2, 2)))
    return L.serial(*block(c1), *block(c2), L.flatten(), L.dropout(rate),
                    L.dense(10, dtype=dtype))


def load(n_train=None, dtype=jnp.float32):
    """Digit images ``(n, 8, 8, 1)`` in [0, 1] and int labels: (train, test) pairs.

    ``n_train`` keeps the first ``n_train`` training images (the test split is always whole).
    """
    tr, te = data.load_digits("train", flatten=False), data.load_digits("test", flatten=False)
    n = tr.n if n_train is None else int(n_train)
    return (tr.x[:n].astype(dtype), tr.y[:n]), (te.x.astype(dtype), te.y)


def _history(result, key):
    return np.array([row[key] for row in result.history])


def main(epochs: int = 12, n_train=None, bn_epochs=None, min_accuracy: float = 0.95,
         dtype="float32", learning_rate: float = 3e-3, batch_size: int = 32,
         gradcheck_examples: int = 4, seed: int = 0):
    """Train the CNN with both engines and the batch-norm/dropout variant; check; return numbers.

    ``epochs``/``n_train`` shrink the run (the test trains 3 epochs); ``bn_epochs``
    defaults to ``epochs``. Returns a dict with the histories, the engine gap, the
    accuracies, the batch-norm state and the gradient-check report.
    """
    t_start = time.perf_counter()
    dt = jnp.dtype(dtype)
    rtol = 1e-4 if dt == jnp.float32 else 1e-9
    (x, y), (x_test, y_test) = load(n_train, dt)
    init_key, fit_key = jax.random.split(jax.random.key(seed))
    opts = dict(optimizer="adam", learning_rate=learning_rate, schedule="cosine",
                batch_size=batch_size, key=fit_key, eval_data=(x_test, y_test), progress=False)
    print(f"digits: {x.shape[0]} training and {x_test.shape[0]} test images {x.shape[1:]}, "
          f"{dt.name}")

    # 1. the CNN, both engines, same init and key
    model = cnn(dtype=dt)
    _, params0 = model.init(init_key, IN_SHAPE)
    runs = {}
    for engine in ("autodiff", "manual"):
        t0 = time.perf_counter()
        runs[engine] = train.fit(model, params0, (x, y), LOSS, epochs=epochs, engine=engine,
                                 **opts)
        print(f"{engine:8s} engine: {time.perf_counter() - t0:5.1f} s (with compiling)")
    loss_a, loss_m = (_history(runs[e], "train_loss") for e in ("autodiff", "manual"))
    acc_a, acc_m = (_history(runs[e], "eval_accuracy") for e in ("autodiff", "manual"))
    print("epoch  train loss (autodiff, manual)   test accuracy (autodiff, manual)")
    for e in range(epochs):
        print(f"{e + 1:5d}  {loss_a[e]:.8f}  {loss_m[e]:.8f}    {acc_a[e]:.4f}  {acc_m[e]:.4f}")
    loss_gap = float(np.max(np.abs(loss_a - loss_m) / np.abs(loss_a)))
    param_gap = max(float(jnp.max(jnp.abs(a - m)) / jnp.max(jnp.abs(a)))
                    for a, m in zip(jax.tree_util.tree_leaves(runs["autodiff"].params),
                                    jax.tree_util.tree_leaves(runs["manual"].params)))
    print(f"largest relative gap between the engines: train loss {loss_gap:.1e}, "
          f"final params {param_gap:.1e} (tolerance {rtol:g})")

    # 2. batch-norm + dropout, manual engine, the running statistics threaded through fit
    bn_model = cnn_bn(dtype=dt)
    _, bn_params0 = bn_model.init(init_key, IN_SHAPE)
    t0 = time.perf_counter()
    bn = train.fit(bn_model, bn_params0, (x, y), LOSS, epochs=bn_epochs or epochs,
                   engine="manual", **opts)
    bn_acc = _history(bn, "eval_accuracy")
    print(f"batch-norm + dropout (manual engine, {time.perf_counter() - t0:.1f} s): test "
          f"accuracy per epoch " + " ".join(f"{a:.3f}" for a in bn_acc))
    first_bn = bn.model_state[1]                 # serial[1] is the first batch_norm
    bn_moved = float(jnp.max(jnp.abs(first_bn["mean"])) + jnp.max(jnp.abs(first_bn["var"] - 1)))
    print(f"first batch-norm running mean {np.round(np.asarray(first_bn['mean'][:4]), 3)}..., "
          f"var {np.round(np.asarray(first_bn['var'][:4]), 3)}...")

    # 3. gradient check of the batch-norm/dropout model in training mode, float64
    xs, ys = x[:gradcheck_examples].astype(jnp.float64), y[:gradcheck_examples]
    report = gradcheck.compare(bn_model, LOSS, bn.params, xs, ys, key=jax.random.key(seed + 1),
                               state=bn.model_state, train=True, fd="full")
    print(f"gradient check on {gradcheck_examples} examples (train mode, fixed dropout key):")
    print(report)

    results = {"history": {e: runs[e].history for e in runs}, "loss_gap": loss_gap,
               "param_gap": param_gap, "rtol": rtol,
               "accuracy": {"autodiff": float(acc_a[-1]), "manual": float(acc_m[-1])},
               "params": runs["manual"].params, "bn_history": bn.history,
               "bn_accuracy": float(bn_acc[-1]), "bn_params": bn.params,
               "bn_state": bn.model_state, "bn_moved": bn_moved, "report": report,
               "test": (x_test, y_test)}
    print(f"total {time.perf_counter() - t_start:.1f} s")

    assert loss_gap < rtol, (loss_gap, rtol)
    assert acc_a[-1] >= min_accuracy and acc_m[-1] >= min_accuracy, (acc_a[-1], acc_m[-1])
    assert bn_acc[-1] >= min_accuracy, bn_acc
    assert bn_moved > 1e-2, bn_moved
    assert report.ok, report
    return results


if __name__ == "__main__":
    main()
