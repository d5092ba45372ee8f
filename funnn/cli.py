"""The ``funnn`` command: ``train``, ``eval``, ``gradcheck``, ``bench``, ``info``.

Exit codes: 0 done; 1 a gradient check that disagrees; 2 bad input (an unknown
name, a non-positive number, a missing or corrupt data directory or checkpoint, an
output directory that cannot be written or belongs to another run), one line on
stderr, never a traceback; 3 a diverged run (a non-finite loss); 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM: ``timeout``, batch schedulers, ``docker stop``). Both
stop like Ctrl-C: the last complete checkpoint stays, ``metrics.json`` says
``"status": "interrupted"`` and ``--resume`` continues bit-for-bit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

__all__ = ["main", "EXIT_OK", "EXIT_BAD_INPUT", "EXIT_DIVERGED", "EXIT_INTERRUPTED",
           "EXIT_TERMINATED"]

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 2, 3, 130, 143


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be (so ``fit`` stops alike)."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # one stop: let it write its files
    raise _Terminated()


def _handle_sigterm():
    """Install the SIGTERM handler (main thread only); the previous handler, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)

# The library's errors name Python arguments; the command line says them with its flags.
_FLAGS = {
    "initialize(coordinator=)": "--coordinator", "initialize(timeout=)": "--init-timeout",
    "initialize(num_processes=)": "--num-processes", "initialize(process_id=)": "--process-id",
    "make_mesh(model=)": "--model-axis", "make_mesh(devices=)": "--devices",
    "parse_sharding(text=)": "--sharding", "parallel.make_mesh(n, model=k)": "--model-axis k",
    "resume=True": "--resume", "overwrite=True": "--overwrite",
    "from_checkpoint=PATH": "--from-checkpoint PATH", "check_numerics=True": "--check-numerics",
    "check_numerics runs": "--check-numerics runs",
    "leave out mesh=": "leave out --devices, --model-axis, --sharding and --coordinator",
    "(a typo in the directory?)": "(a typo in --out?)",
    "noise_multiplier * clip_norm": "--dp-noise * --dp-clip", "clip_norm": "--dp-clip",
    "noise_multiplier": "--dp-noise", "target_epsilon": "--dp-epsilon",
    "accountant 'pld'": "--dp-accountant pld", "accountant 'rdp'": "--dp-accountant rdp",
    "sampling 'fixed'": "--dp-sampling fixed",
    "fit: ": "", "dp= trains": "DP-SGD (--dp-clip, --dp-noise) trains", "with dp=":
    "with --dp-clip/--dp-noise", "leave out precision=": "leave out --precision ",
}


def _in_flags(err: BaseException | str) -> str:
    """An error's one line, with each library argument name (``make_mesh(model=)``,
    ``resume=True``) replaced by the flag that sets it (``--model-axis``, ``--resume``)."""
    text = str(err)
    for arg in sorted(_FLAGS, key=len, reverse=True):       # the longest name first
        text = text.replace(arg, _FLAGS[arg])
    return text


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
_seed = _arg(int, lambda v: 0 <= v < 2 ** 32, "an integer seed", "seed must lie in [0, 2**32)")
_FLOAT32_MAX = 3.4028234663852886e38
_learning_rate = _arg(float, lambda v: 0 < v <= _FLOAT32_MAX, "a positive number",
                      "must be a positive number that is finite in float32 (at most 3.4e38)")
_positive_float = _arg(float, lambda v: 0 < v < float("inf"), "a positive number",
                      "must be a positive finite number")
_non_negative_float = _arg(float, lambda v: 0 <= v < float("inf"), "a number >= 0",
                           "must be a finite number >= 0")
_delta = _arg(float, lambda v: 0 < v < 1, "a number in (0, 1)", "must lie in (0, 1)")
_process_id = _arg(int, lambda v: v >= 0, "a process id", "must be 0 or more")
_seconds = _arg(float, lambda v: 0 < v < float("inf"), "a number of seconds",
                "must be a positive number of seconds")


def _parallel_args(p: argparse.ArgumentParser, sharding: bool = True) -> None:
    """Devices, mesh and processes: the options ``train`` and ``info`` share."""
    p.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                   help="train on the first N local devices of each process (data parallel)")
    p.add_argument("--model-axis", type=_positive_int, default=1, metavar="M",
                   help="tensor-parallel degree: a mesh of (devices / M) x M")
    if sharding:
        p.add_argument("--sharding", default="replicated", metavar="SPEC",
                       help="replicated (default), fsdp, tensor, or JSON rules by parameter "
                            "path, e.g. '{\"0.W\": [null, \"model\"], \"*\": \"fsdp\"}'")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address, to join a multi-process job (jax.distributed); "
                        "'auto' lets JAX detect SLURM, Open MPI or TPU pods")
    p.add_argument("--num-processes", type=_positive_int, default=None, metavar="P")
    p.add_argument("--process-id", type=_process_id, default=None, metavar="I")
    p.add_argument("--init-timeout", type=_seconds, default=60.0, metavar="S",
                   help="seconds to wait for the coordinator and the other processes "
                        "(default 60)")


def _parser() -> argparse.ArgumentParser:
    from funnn import models, train

    p = argparse.ArgumentParser(prog="funnn", description="Functional neural networks on JAX, "
                                "with a hand-written backward pass beside autodiff.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: an MLP on the shipped digits)")
    t.add_argument("--model", default="mlp", choices=list(models.RECIPES),
                   help="mlp (default), cnn, rnn, or sigmoid (the [64,30,10] network of "
                        "Nielsen's book Neural Networks and Deep Learning)")
    t.add_argument("--data", default="digits",
                   help="digits (shipped, default), mnist:DIR (local IDX files), xor, spirals")
    t.add_argument("--engine", default="autodiff", choices=list(train.ENGINES),
                   help="gradient engine: autodiff, manual (hand-written backward), bridge")
    t.add_argument("--optimizer", default=None, choices=list(train.OPTIMIZERS),
                   help="default: the model's recipe (another optimizer drops the recipe's "
                        "rate and schedule: its own default rate, constant schedule)")
    t.add_argument("--lr", "--learning-rate", dest="lr", type=_learning_rate, default=None)
    t.add_argument("--schedule", default=None, choices=list(train.SCHEDULES),
                   help="learning-rate schedule; default: the recipe's, with its optimizer")
    t.add_argument("--epochs", type=_positive_int, default=None)
    t.add_argument("--batch-size", type=_positive_int, default=None)
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--out", default=None,
                   help="run directory: run.json, checkpoints/, metrics.json, curves.png "
                        "(default: a new runs/<model>-<date>-<time>)")
    how = t.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its newest checkpoint (settings "
                          "must match; --epochs may grow)")
    how.add_argument("--overwrite", action="store_true",
                     help="delete the run in --out (only files funnn wrote) and start anew")
    t.add_argument("--from-checkpoint", default=None, metavar="PATH",
                   help="with --resume: resume from this checkpoint instead of the newest; "
                        "without: start a new run from its weights")
    t.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"],
                   help="mixed precision: float32 master weights, layers computing in "
                        "bfloat16 (bf16) or float16 with dynamic loss scaling (f16); "
                        "default f32")
    t.add_argument("--check-numerics", action="store_true",
                   help="check every step; name the first layer and step that go non-finite")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--dp-clip", type=_positive_float, default=None, metavar="C",
                   help="DP-SGD: clip each example's gradient to norm C (needs --dp-noise)")
    t.add_argument("--dp-noise", type=_non_negative_float, default=None, metavar="S",
                   help="DP-SGD: Gaussian noise of standard deviation S*C on the clipped sum")
    t.add_argument("--dp-delta", type=_delta, default=None, metavar="D",
                   help="DP-SGD: the delta epsilon is reported at (default 1e-5)")
    t.add_argument("--dp-sampling", default=None, choices=["poisson", "fixed"],
                   help="DP-SGD batch sampling (default poisson; see funnn.privacy)")
    t.add_argument("--dp-epsilon", type=_positive_float, default=None, metavar="E",
                   help="DP-SGD: choose the noise multiplier for epsilon E after all epochs "
                        "(needs --dp-clip; instead of --dp-noise)")
    t.add_argument("--dp-accountant", default=None, choices=["rdp", "pld"],
                   help="DP-SGD accountant: rdp (default) or pld (tighter; poisson only)")
    _parallel_args(t)

    e = sub.add_parser("eval", help="loss and accuracy of a run's checkpoint")
    e.add_argument("run_dir", help="a run directory written by funnn train")
    e.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint file (default: the run's newest)")
    e.add_argument("--data", default=None,
                   help="dataset to evaluate on (default: the run's own); its test split")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object (loss, accuracy, ...) as the last line")
    e.add_argument("--laplace", default=None, choices=["diag", "kfac"],
                   help="also fit a Laplace posterior (diagonal or K-FAC GGN) on the run's "
                        "training split and report its predictive's calibration")
    e.add_argument("--subset", default="last-layer", choices=["last-layer", "all"],
                   help="with --laplace: the params the posterior covers (default last-layer)")
    e.add_argument("--prior-precision", type=_positive_float, default=None, metavar="P",
                   help="with --laplace: the prior precision (default: maximise the marginal "
                        "likelihood)")
    e.add_argument("--predictive", default="probit", choices=["probit", "samples"],
                   help="with --laplace: probit approximation (default) or 100 sampled logits")

    g = sub.add_parser("gradcheck", help="manual vs autodiff vs finite differences, per leaf")
    g.add_argument("--model", default="mlp", choices=list(models.RECIPES))
    g.add_argument("--examples", type=_positive_int, default=4, help="digits used for the check")
    g.add_argument("--fd", default="auto", choices=["auto", "full", "directional", "none"])
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("--seed", type=_seed, default=0)

    b = sub.add_parser("bench", help="benchmark suites with 95%% intervals and an A/A "
                                     "control; 'funnn bench compare OLD NEW' compares runs")
    from funnn.bench import _cli as cli_args
    cli_args.add(b, _positive_int)

    i = sub.add_parser("info", help="JAX version, devices, processes, the mesh, optional "
                                     "extras")
    _parallel_args(i, sharding=False)
    return p


def main(argv=None) -> int:
    """Entry point of the ``funnn`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    from funnn.core import FunnnError
    from funnn.train import TrainingDiverged

    previous = _handle_sigterm()
    try:
        return {"train": _train, "eval": _eval, "gradcheck": _gradcheck, "bench": _bench,
                "info": _info}[args.command](args)
    except TrainingDiverged as err:
        print(f"funnn {args.command}: diverged: {_in_flags(err)}", file=sys.stderr)
        return EXIT_DIVERGED
    except (FunnnError, OSError) as err:
        print(f"funnn {args.command}: error: {_in_flags(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as err:
        term = isinstance(err, _Terminated)
        print(f"funnn {args.command}: {'terminated (SIGTERM)' if term else 'interrupted'}",
              file=sys.stderr)
        return EXIT_TERMINATED if term else EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fresh_out(model: str) -> str:
    """``runs/<model>-<YYYYmmdd-HHMMSS>``, suffixed ``-2``, ``-3``... if that exists."""
    base = os.path.join("runs", f"{model}-{time.strftime('%Y%m%d-%H%M%S')}")
    out, i = base, 1
    while os.path.exists(out):
        i += 1
        out = f"{base}-{i}"
    return out


def _train_config(args, recipe, train_set, x, ex) -> dict:
    """Every setting that shapes the run's results, as it will actually run."""
    from funnn import train

    chosen = train.optimizer_settings(args.optimizer, args.lr, args.schedule, recipe=(
        recipe.optimizer, recipe.learning_rate, recipe.schedule))
    asked = args.batch_size or recipe.batch_size
    batch, epochs = min(asked, int(x.shape[0])), args.epochs or recipe.epochs
    dp = _dp(args, int(x.shape[0]), batch, epochs)
    target = {} if args.dp_epsilon is None else {"dp_epsilon_target": args.dp_epsilon}
    return {**({} if dp is None else dp.config()), **target,
            "model": recipe.name, "data": args.data, "engine": args.engine,
            "precision": args.precision, **chosen,
            "epochs": epochs, "batch_size": batch, "batch_size_asked": asked,
            "seed": args.seed, "standardize": recipe.standardize,
            "num_outputs": train_set.num_classes or int(train_set.y.shape[-1]),
            "input_shape": list(x.shape[1:]), "train_examples": int(x.shape[0]),
            "test_examples": int(ex.shape[0])}


def _dp(args, num_examples: int, batch_size: int, epochs: int):
    """The DP-SGD settings the options ask for, or None. With ``--dp-epsilon`` the noise
    multiplier is :func:`funnn.privacy.noise_for` this run's steps (``epochs`` times
    ``num_examples // batch_size``)."""
    from funnn import privacy
    from funnn.core import ConfigError

    given = [o for o, v in (("--dp-delta", args.dp_delta), ("--dp-sampling", args.dp_sampling),
                            ("--dp-accountant", args.dp_accountant)) if v is not None]
    if args.dp_epsilon is not None and args.dp_noise is not None:
        raise ConfigError("give --dp-noise S or --dp-epsilon E, not both (--dp-epsilon "
                          "chooses the noise)", ("--dp-epsilon",))
    has_noise = args.dp_noise is not None or args.dp_epsilon is not None
    if args.dp_clip is None and not has_noise:
        if given:
            raise ConfigError(f"{given[0]} needs --dp-clip C and --dp-noise S (or "
                              f"--dp-epsilon E)", (given[0],))
        return None
    if args.dp_clip is None or not has_noise:
        missing = "--dp-clip" if args.dp_clip is None else "--dp-noise"
        raise ConfigError(f"DP-SGD needs both --dp-clip C and --dp-noise S (or --dp-epsilon "
                          f"E); {missing} is missing", (missing,))
    delta = 1e-5 if args.dp_delta is None else args.dp_delta
    sampling, accountant = args.dp_sampling or "poisson", args.dp_accountant or "rdp"
    noise = args.dp_noise
    if args.dp_epsilon is not None:
        privacy.DP(args.dp_clip, 1.0, delta, sampling, accountant)     # flags checked first
        noise = privacy.noise_for(args.dp_epsilon, batch_size, num_examples,
                                  epochs * (num_examples // batch_size), delta, sampling,
                                  accountant)
    return privacy.DP(args.dp_clip, noise, delta, sampling, accountant)


def _dp_of(config: dict):
    """The DP-SGD settings a run config records (:meth:`funnn.privacy.DP.config`), or None."""
    from funnn import privacy

    if "dp_clip" not in config:
        return None
    return privacy.DP(config["dp_clip"], config["dp_noise"], config["dp_delta"],
                      config["dp_sampling"], config.get("dp_accountant", "rdp"))


def _describe(recipe, config: dict) -> str:
    c = config
    batch = f"batch {c['batch_size']}" + (
        f" (asked {c['batch_size_asked']}; the training set has {c['train_examples']} "
        f"examples)" if c["batch_size"] != c["batch_size_asked"] else "")
    return (f"funnn train: {recipe.name}: {recipe.about}; data {c['data']} "
            f"({c['train_examples']} train, {c['test_examples']} test); engine {c['engine']}"
            f"{'' if c.get('precision', 'f32') == 'f32' else ', precision ' + c['precision']}; "
            f"optimizer {c['optimizer']}, lr {c['learning_rate']:g}, {c['schedule']} schedule, "
            f"{c['epochs']} epochs, {batch}"
            + (f"; DP-SGD clip {c['dp_clip']:g}, noise {c['dp_noise']:.4g}"
               + (f" (chosen for epsilon {c['dp_epsilon_target']:g})"
                  if "dp_epsilon_target" in c else "")
               + f", delta {c['dp_delta']:g}, {c['dp_sampling']} sampling"
               + (f", {c['dp_accountant']} accountant" if "dp_accountant" in c else "")
               if "dp_clip" in c else ""))


def _join(args) -> None:
    """Join the multi-process job the options name (before JAX starts), if any."""
    from funnn import parallel
    from funnn.core import ConfigError

    if args.coordinator is None:
        if args.num_processes is not None or args.process_id is not None:
            raise ConfigError("--num-processes and --process-id need --coordinator HOST:PORT",
                              ("--coordinator",))
        return
    auto = args.coordinator == "auto"
    if not auto and (args.num_processes is None or args.process_id is None):
        raise ConfigError("--coordinator HOST:PORT needs --num-processes and --process-id",
                          ("--coordinator",))
    who = "this process" if auto else f"process {args.process_id} of {args.num_processes}"
    where = "the job JAX detects" if auto else args.coordinator
    print(f"funnn {args.command}: {who} joins {where}; waits up to "
          f"{args.init_timeout:g} s for the others", flush=True)
    parallel.initialize(args.coordinator, args.num_processes, args.process_id,
                        timeout=args.init_timeout)


def _mesh(args):
    """The mesh the options ask for, or None (one device, no mesh) when they ask for none."""
    from funnn import parallel

    if (args.devices is None and args.coordinator is None and args.model_axis == 1
            and getattr(args, "sharding", "replicated") == "replicated"):
        return None
    return parallel.make_mesh(args.devices, model=args.model_axis)


def _train(args) -> int:
    """Parse, load, build, :func:`funnn.train.fit` (which owns the run directory), print."""
    import jax

    from funnn import _files, data, distributed, models, parallel, train
    from funnn.core import ConfigError, FunnnError

    _join(args)
    distributed.check_backend()
    recipe = models.get(args.model)
    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out naming the run directory to continue",
                          ("--resume",))
    out = args.out if args.out is not None else _fresh_out(recipe.name)
    try:
        mesh, sharding = _mesh(args), parallel.parse_sharding(args.sharding)
        train_set, test_set = data.load(args.data)
        mean, scale = models.input_stats(train_set)
        x, y = models.prepare(recipe, train_set, (mean, scale))
        ex, ey = models.prepare(recipe, test_set, (mean, scale))
        config = _train_config(args, recipe, train_set, x, ex)
        model = recipe.build(config["num_outputs"])
    except (FunnnError, OSError) as err:
        parallel.agree(err)     # the other processes stop too, instead of waiting in fit
        raise
    k_init, k_train = jax.random.split(jax.random.key(args.seed))
    _, params = model.init(k_init, (None,) + tuple(x.shape[1:]))
    print(_describe(recipe, config))
    if mesh is not None:
        print(f"funnn train: mesh {parallel.describe(mesh)}; process {jax.process_index()} of "
              f"{jax.process_count()}; parameters {args.sharding}")
    start = args.from_checkpoint
    if start is not None and not args.resume:
        start = os.path.abspath(start)      # a new run records where its weights came from
    t0 = time.perf_counter()
    result = train.fit(
        model, params, (x, y), recipe.loss, config["optimizer"],
        learning_rate=config["learning_rate"], epochs=config["epochs"],
        batch_size=config["batch_size"], engine=args.engine, key=k_train,
        eval_data=(ex, ey), schedule=config["schedule"], progress=False if args.quiet else None,
        run_dir=out, resume=args.resume, overwrite=args.overwrite, from_checkpoint=start,
        config=config,
        extras={"input_mean": mean, "input_scale": scale} if recipe.standardize else None,
        check_numerics=args.check_numerics, log=print, mesh=mesh, sharding=sharding,
        precision=args.precision, dp=_dp_of(config))
    seconds = time.perf_counter() - t0
    last = result.history[-1]
    if not parallel.is_main():
        print(f"epoch {last['epoch']}: train loss {last['train_loss']:.4f} (process "
              f"{jax.process_index()} of {jax.process_count()}; process 0 writes the run "
              f"directory)")
        return 0
    print(f"epoch {last['epoch']}: train loss {last['train_loss']:.4f}, test loss "
          f"{last.get('eval_loss', float('nan')):.4f}, test accuracy "
          f"{_pct(last.get('eval_accuracy'))}"
          + (f", epsilon {last['epsilon']:.3g} at delta {(result.config or {})['dp_delta']:g}"
             if "epsilon" in last else "") + f" ({seconds:.1f} s)")
    plotted = _files.can_plot()
    print(f"wrote {out}/metrics.json, {out}/checkpoints/"
          + (f", {out}/curves.png" if plotted else " (install matplotlib for curves.png)"))
    return 0


def _pct(v) -> str:
    import math

    return f"{v:.2%}" if isinstance(v, float) and math.isfinite(v) else "n/a"


def _eval(args) -> int:
    from funnn import data, distributed, models, rundir, train
    from funnn.core import CheckpointError, DataError

    distributed.check_backend()
    run_dir = args.run_dir
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run directory {run_dir!r} does not exist")
    if args.checkpoint:
        path, (config, recipe, model, ck) = args.checkpoint, _eval_load(args.checkpoint, run_dir)
    else:       # the newest that reads whole: a run that trains may prune one meanwhile
        path, (config, recipe, model, ck), skipped = rundir.load_newest(
            os.path.join(run_dir, "checkpoints"), lambda p: _eval_load(p, run_dir))
        for line in skipped:
            print(f"note: skipped {line}")
    stats = None
    if config.get("standardize"):
        extras = ck.extras or {}
        if "input_mean" not in extras or "input_scale" not in extras:
            raise CheckpointError(f"checkpoint {path}: the model standardises its inputs but "
                                  f"the checkpoint holds no input statistics")
        stats = (extras["input_mean"], extras["input_scale"])
    name = args.data or config["data"]
    _, test_set = data.load(name)
    if stats is not None and tuple(stats[0].shape) != tuple(test_set.x.shape[1:]):
        raise DataError(f"dataset {name!r} has inputs of shape {tuple(test_set.x.shape[1:])}; "
                        f"the run was trained on {tuple(stats[0].shape)}")
    x, y = models.prepare(recipe, test_set, stats)
    if list(x.shape[1:]) != list(config["input_shape"]):
        raise DataError(f"dataset {name!r} gives model inputs of shape {tuple(x.shape[1:])}; "
                        f"the run was trained on {tuple(config['input_shape'])}")
    loss, acc = train.evaluate(model, recipe.loss, ck.params, x, y, ck.model_state)
    print(f"{path} (epoch {ck.step}): {name} test split, {x.shape[0]} examples: loss "
          f"{loss:.4f}, accuracy {_pct(acc)}")
    report = {"loss": loss, "accuracy": acc, "checkpoint": path, "epoch": ck.step, "data": name,
              "examples": int(x.shape[0]), "run_id": ck.run}
    report.update(_eval_calibration(args, config, recipe, model, ck, stats, x, y))
    if args.json:
        from funnn import _files
        print(_files.strict_json(report))
    return 0


def _eval_calibration(args, config, recipe, model, ck, stats, x, y) -> dict:
    """ECE and NLL of the softmax, and with ``--laplace`` of a Laplace posterior's predictive
    fitted on the run's own training split; printed, and returned for ``--json``."""
    import jax

    from funnn import calibration, data, laplace, models
    from funnn.core import ConfigError

    if getattr(recipe.loss, "name", None) != "softmax_cross_entropy" or model.stateful:
        if args.laplace:
            raise ConfigError(f"needs a classifier trained with the softmax "
                              f"cross-entropy and no batch statistics; model {recipe.name} "
                              f"has {recipe.loss!r}", ("--laplace",))
        return {}
    labels = jax.device_get(y)
    probs = jax.nn.softmax(model.apply(ck.params, x), -1)
    out = {"ece": calibration.expected_calibration_error(probs, labels),
           "nll": calibration.nll(probs, labels)}
    print(f"calibration (softmax): ECE {out['ece']:.4f} (15 bins), NLL {out['nll']:.4f}")
    if not args.laplace:
        return out
    train_set, _ = data.load(config["data"])
    tx, ty = models.prepare(recipe, train_set, stats)
    post = laplace.laplace(model, recipe.loss, ck.params, (tx, ty),
                           subset=args.subset.replace("-", "_"), structure=args.laplace,
                           prior_precision=args.prior_precision)
    probs = post.predictive(x, method=args.predictive, key=jax.random.key(0))
    delta = float(post.prior_precision)
    lap = {"structure": args.laplace, "subset": args.subset, "predictive": args.predictive,
           "prior_precision": delta, "log_marginal": float(post.log_marginal),
           "ece": calibration.expected_calibration_error(probs, labels),
           "nll": calibration.nll(probs, labels),
           "accuracy": float((probs.argmax(-1) == y).mean())}
    how = "given" if args.prior_precision is not None else "by marginal likelihood"
    print(f"calibration (laplace {args.laplace}, {args.subset}, {args.predictive}; prior "
          f"precision {delta:.4g} {how}, fitted on {tx.shape[0]} training examples): ECE "
          f"{lap['ece']:.4f}, NLL {lap['nll']:.4f}, accuracy {_pct(lap['accuracy'])}")
    return {**out, "laplace": lap}


def _eval_load(path: str, run_dir: str):
    """``(config, recipe, model, checkpoint)`` of the checkpoint ``path`` of a train run."""
    from funnn import models, precision, rundir, train
    from funnn.core import CheckpointError

    config = rundir.read_config(path)
    rundir.check_same_run(run_dir, path)
    missing = [k for k in ("model", "data", "num_outputs", "input_shape") if k not in config]
    if missing:
        raise CheckpointError(f"checkpoint {path} does not say how to predict (its config "
                              f"lacks {', '.join(missing)}); it was not written by funnn train")
    recipe = models.get(config["model"])
    ck = train.restore_run(run_dir, recipe.build(config["num_outputs"]), checkpoint=path)
    model = precision.apply_policy(recipe.build(config["num_outputs"]),
                                   config.get("precision"))   # compute as it trained
    return config, recipe, model, ck


def _gradcheck(args) -> int:
    import jax

    from funnn import data, distributed, gradcheck, models
    from funnn.core import ConfigError

    distributed.check_backend()

    recipe = models.get(args.model)
    train_set, _ = data.load("digits")
    x, y = models.prepare(recipe, train_set)
    if args.examples > x.shape[0]:
        raise ConfigError(f"--examples {args.examples} exceeds the {x.shape[0]} examples of the "
                          f"digits training split", ("gradcheck",))
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
    from funnn.bench import _cli as cli_args

    if "parallel" in cli_args.suite_names(args):  # before JAX starts: 8 simulated CPU devices
        from funnn import parallel
        parallel.simulate_cpu_devices(8)
    return cli_args.main(args)


def _info(args) -> int:
    import importlib.util
    import platform

    import jax

    import funnn

    print(f"funnn {funnn.__version__}, Python {platform.python_version()}")
    joined = None
    try:  # info diagnoses broken set-ups, so it reports failures instead of raising them
        joined = _info_join(args)
        print(f"jax {jax.__version__}, backend {jax.default_backend()}")
        for d in jax.devices():
            print(f"  device {d.id}: {d.device_kind} ({d.platform}), process {d.process_index}")
        _info_mesh(args)
    except Exception as err:  # any backend failure is what info must report
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"jax {jax.__version__}, backend unavailable: {msg}")
        print(f"  JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '(unset)')}; unset it or set "
              f"JAX_PLATFORMS=cpu to use the CPU")
    extras = ["optax", "chex", "tqdm", "safetensors", "matplotlib", "hypothesis", "pytest"]
    have = {m: importlib.util.find_spec(m) is not None for m in extras}
    print("extras: " + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in have.items()))
    if joined is not None:      # the job it was asked to join: exit 2, its reason on stderr
        print(f"funnn info: error: {joined}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _info_join(args) -> str | None:
    """Join the job the options name; why it could not (in flags), or None."""
    from funnn.core import FunnnError

    try:
        _join(args)
    except FunnnError as err:
        print(f"processes: cannot join the job: {_in_flags(err)}")
        return _in_flags(err)
    return None


def _info_mesh(args) -> None:
    import jax

    from funnn import parallel
    from funnn.core import FunnnError

    print(f"processes: {jax.process_count()} (this is process {jax.process_index()}), "
          f"{jax.local_device_count()} local device(s), {jax.device_count()} in all")
    try:
        asked = _mesh(args)
        mesh = asked if asked is not None else parallel.make_mesh(None, model=args.model_axis)
    except FunnnError as err:
        print(f"mesh: {_in_flags(err)}")
        return
    if asked is None:
        print(f"mesh: none (funnn train uses one device unless --devices, --model-axis, "
              f"--sharding or --coordinator ask); all devices would give "
              f"{parallel.describe(mesh)}")
    else:
        print(f"mesh: {parallel.describe(mesh)}; each batch split {mesh.shape['data']} ways")


if __name__ == "__main__":
    sys.exit(main())
