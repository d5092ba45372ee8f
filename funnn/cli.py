"""The ``funnn`` command: ``train``, ``gradcheck``, ``bench``, ``info``.

Bad input (an unknown name, a non-positive number, a missing or corrupt data
directory or checkpoint, an output directory that cannot be written) ends with a
one-line message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

__all__ = ["main"]


def _arg(cast, ok, expect: str, bound: str):
    """An argparse type: ``cast`` the text, then require ``ok(value)``; one-line errors."""

    def parse(text):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{bound}, got {text}")
        return v

    return parse


_positive_int = _arg(int, lambda v: v > 0, "a positive integer", "must be a positive integer")
_positive_float = _arg(float, lambda v: 0 < v < float("inf"), "a positive number",
                       "must be a positive number")          # NaN fails 0 < v
_seed = _arg(int, lambda v: 0 <= v < 2 ** 32, "an integer seed", "seed must lie in [0, 2**32)")


def _parser() -> argparse.ArgumentParser:
    from funnn import models, train

    p = argparse.ArgumentParser(prog="funnn", description="Functional neural networks on JAX, "
                                "with a hand-written backward pass beside autodiff.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: an MLP on the shipped digits)")
    t.add_argument("--model", default="mlp", choices=list(models.RECIPES),
                   help="mlp (default), cnn, rnn, or sigmoid (the seed notes' [64,30,10] network)")
    t.add_argument("--data", default="digits",
                   help="digits (shipped, default), mnist:DIR (local IDX files), xor, spirals")
    t.add_argument("--engine", default="autodiff", choices=list(train.ENGINES),
                   help="gradient engine: autodiff, manual (hand-written backward), bridge")
    t.add_argument("--optimizer", default=None, choices=list(train.OPTIMIZERS),
                   help="default: the model's recipe")
    t.add_argument("--lr", "--learning-rate", dest="lr", type=_positive_float, default=None)
    t.add_argument("--epochs", type=_positive_int, default=None)
    t.add_argument("--batch-size", type=_positive_int, default=None)
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--out", default="runs/train",
                   help="output directory: checkpoints/, metrics.json, curves.png")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    g = sub.add_parser("gradcheck", help="manual vs autodiff vs finite differences, per leaf")
    g.add_argument("--model", default="mlp", choices=list(models.RECIPES))
    g.add_argument("--examples", type=_positive_int, default=4, help="digits used for the check")
    g.add_argument("--fd", default="auto", choices=["auto", "full", "directional", "none"])
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("--seed", type=_seed, default=0)

    b = sub.add_parser("bench", help="time training steps: engines, jit vs eager")
    b.add_argument("--model", default="mlp", choices=list(models.RECIPES))
    b.add_argument("--batch-size", type=_positive_int, default=128)
    b.add_argument("--repeats", type=_positive_int, default=50)
    b.add_argument("--json", action="store_true")

    sub.add_parser("info", help="JAX version, devices, optional extras")
    return p


def main(argv=None) -> int:
    """Entry point of the ``funnn`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    from funnn.core import FunnnError

    try:
        return {"train": _train, "gradcheck": _gradcheck, "bench": _bench,
                "info": _info}[args.command](args)
    except (FunnnError, OSError) as err:
        print(f"funnn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"funnn {args.command}: interrupted", file=sys.stderr)
        return 130


def _writable_dir(path: str) -> str:
    from funnn.core import ConfigError

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"output directory {path!r} cannot be written ({err.strerror or err})",
                          ("--out",)) from None
    return path


def _write_json(path: str, obj) -> None:
    """Write JSON atomically: a temporary file in the same directory, then rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plot(path: str, history: list) -> bool:
    """Loss and accuracy curves as a PNG (needs the optional matplotlib extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    if "eval_loss" in history[0]:
        ax1.plot(epochs, [r["eval_loss"] for r in history], label="test")
        ax2.plot(epochs, [r["eval_accuracy"] for r in history], color="C2")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    ax2.set(xlabel="epoch", ylabel="accuracy", title="test accuracy")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def _train(args) -> int:
    import jax

    from funnn import data, models, train

    recipe = models.get(args.model)
    out = _writable_dir(args.out)
    train_set, test_set = data.load(args.data)
    stats = models.input_stats(train_set)
    x, y = models.prepare(recipe, train_set, stats)
    ex, ey = models.prepare(recipe, test_set, stats)
    model = recipe.build(train_set.num_classes or int(train_set.y.shape[-1]))
    key = jax.random.key(args.seed)
    k_init, k_train = jax.random.split(key)
    _, params = model.init(k_init, (None,) + tuple(x.shape[1:]))
    config = {"model": recipe.name, "data": args.data, "engine": args.engine,
              "optimizer": args.optimizer or recipe.optimizer,
              "learning_rate": args.lr or recipe.learning_rate,
              "epochs": args.epochs or recipe.epochs,
              "batch_size": args.batch_size or recipe.batch_size, "seed": args.seed,
              "schedule": recipe.schedule, "standardize": recipe.standardize}
    print(f"funnn train: {recipe.about}; data {args.data} ({x.shape[0]} train, "
          f"{ex.shape[0]} test); engine {args.engine}; {config['optimizer']} "
          f"lr {config['learning_rate']}, {config['epochs']} epochs, batch {config['batch_size']}")
    t0 = time.perf_counter()
    result = train.fit(model, params, (x, y), recipe.loss, config["optimizer"],
                       learning_rate=config["learning_rate"], epochs=config["epochs"],
                       batch_size=min(config["batch_size"], int(x.shape[0])),
                       engine=args.engine, key=k_train, eval_data=(ex, ey),
                       schedule=recipe.schedule,
                       progress=False if args.quiet else None,
                       checkpoint_dir=os.path.join(out, "checkpoints"), resume=args.resume,
                       config=config)
    seconds = time.perf_counter() - t0
    last = result.history[-1]
    metrics = {"config": config, "history": result.history, "seconds": seconds,
               "final": last}
    _write_json(os.path.join(out, "metrics.json"), metrics)
    plotted = _plot(os.path.join(out, "curves.png"), result.history)
    acc = last.get("eval_accuracy")
    print(f"epoch {last['epoch']}: train loss {last['train_loss']:.4f}, test loss "
          f"{last.get('eval_loss', float('nan')):.4f}, test accuracy {acc:.2%} "
          f"({seconds:.1f} s)")
    print(f"wrote {out}/metrics.json, {out}/checkpoints/"
          + (f", {out}/curves.png" if plotted else " (install matplotlib for curves.png)"))
    return 0


def _gradcheck(args) -> int:
    import jax

    from funnn import data, gradcheck, models

    recipe = models.get(args.model)
    train_set, _ = data.load("digits")
    x, y = models.prepare(recipe, train_set)
    x, y = x[: args.examples], y[: args.examples]
    model = recipe.build(train_set.num_classes)
    k_init, k_jitter = jax.random.split(jax.random.key(args.seed))
    _, params = model.init(k_init, (None,) + tuple(x.shape[1:]))
    # Check at a generic point: zero biases on the digits' blank pixels put ReLUs exactly
    # on their kink, where finite differences see a one-sided slope.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(k_jitter, len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [
        l + 0.05 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])
    report = gradcheck.compare(model, recipe.loss, params, x, y, fd=args.fd)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1


def _bench(args) -> int:
    from funnn import bench

    rows = bench.engine_table(args.model, batch_size=args.batch_size, repeats=args.repeats)
    print(json.dumps(rows, indent=2) if args.json else bench.format_table(rows))
    return 0


def _info(args) -> int:
    import importlib.util
    import platform

    import jax

    import funnn

    print(f"funnn {funnn.__version__}, Python {platform.python_version()}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    for d in jax.devices():
        print(f"  device {d.id}: {d.device_kind} ({d.platform})")
    extras = ["optax", "chex", "tqdm", "safetensors", "matplotlib", "hypothesis", "pytest"]
    have = {m: importlib.util.find_spec(m) is not None for m in extras}
    print("extras: " + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in have.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
