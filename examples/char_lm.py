"""A character-level language model of Shakespeare: a causal transformer, or an LSTM.

The text is the opening of *Coriolanus* shipped beside this script
(``examples/data/coriolanus.txt``, public domain; see ``examples/data/README.md``). Every
non-empty line is one example: the input is a newline followed by the line's characters,
the target the line's characters followed by a newline, so the model learns where a line
starts and where it ends (the newline is both the begin and the end mark)::

    x:  \\n  F  i  r  s  t  ... :  <pad> <pad>
    y:   F  i  r  s  t  ... :  \\n  -100  -100

Lines are right-padded to the longest (59 characters + 1); padded targets are -100, which
``softmax_cross_entropy.with_ignore_index(-100)`` leaves out, so the "mean" loss is the mean
over real characters and padding adds nothing to the loss or its gradient. The key-padding
``mask`` goes to the model as a side input, ``fit``'s data ``(x, y, {"mask": mask})``: the
causal attention drops padded keys and the LSTM carries its state unchanged over padding.
(With right padding and a causal model no padded position can reach a real one anyway; the
mask is what makes that hold for any padding, and the loss mask is what makes it right.)
The last tenth of the lines is held out.

Models (``--model``):

- ``transformer``: ``embedding(V, 64)``, two pre-norm causal ``transformer_block``\\ s with
  rotary position embeddings (4 heads, MLP 256, dropout 0.1), ``rms_norm``, ``dense(V)``;
- ``lstm``: ``embedding(V, 64)``, ``lstm(192)``, ``dropout(0.1)``, ``dense(V)``: the
  "RNNs on text" example of the curriculum.

Both train with :func:`funnn.train.fit` (AdamW, weight decay 0.1, peak rate 5e-3 with a
warm-up and a cosine decay; 24 epochs of batches of 16 lines) with either gradient engine
(``--engine autodiff|manual``) and under the bfloat16 policy (``--precision bf16``). Each
epoch prints the validation bits per character, ``mean(-log2 p(next char))`` over the
5,073 held-out characters (each line's closing newline included); a model that knows
nothing scores ``log2(V)`` (V = 59 symbols: 5.88 bits), one that knows only the training
lines' character frequencies 4.74. At the end it prints a few lines sampled at temperature
0.8 from the 10 likeliest characters: the transformer's through
:func:`funnn.generate.generate` (KV cache), the LSTM's by re-running the whole prefix each
step (:func:`sample_by_recompute`).

What it checks (the end of :func:`main`): the two engines' losses on the first batch agree
(they run different code: ``apply`` under ``jax.grad`` and the hand-written
``forward``/``backward``), the last epoch's validation loss reported by ``fit`` equals bits
per character recomputed here in numpy, the validation figure is finite and below 3 bits
(below ``log2(V)`` with ``--tiny`` or changed sizes), and every sample decodes to characters
of the vocabulary.

    python examples/char_lm.py [--model lstm] [--engine manual] [--precision bf16]
        [--epochs 24] [--batch-size 16] [--width 64] [--seed 0] [--tiny]

Measured on the 2-core CPU, defaults (f32, autodiff, seed 0): the transformer ends at 2.41
bits per character (79 CPU-seconds in all, 82 s wall), the LSTM at 2.37 (74, 82 s); the
transformer with ``--engine manual`` at 2.41 too (83 CPU-seconds), under ``--precision
bf16`` at 2.40 (106 CPU-seconds: no faster than float32 on this CPU). A transformer sample:
"As the care state, it the have but he should".
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from funnn import engines, losses, precision, train
from funnn import generate as gen
from funnn import layers as L

TEXT = pathlib.Path(__file__).resolve().parent / "data" / "coriolanus.txt"
NEWLINE = "\n"                     # begins (in x) and ends (in y) every line
IGNORE = losses.IGNORE_INDEX       # -100: the target of a padded position
LOSS = losses.softmax_cross_entropy.with_ignore_index(IGNORE)

DEFAULT = dict(width=64, depth=2, heads=4, hidden=192, dropout=0.1, epochs=24, batch_size=16,
               learning_rate=5e-3, weight_decay=0.1, max_lines=None)
TINY = dict(width=16, depth=1, heads=2, hidden=16, dropout=0.0, epochs=1, batch_size=16,
            learning_rate=1e-2, weight_decay=0.0, max_lines=80)


# --------------------------------------------------------------------------- data


def read_lines(path=TEXT, max_lines: int | None = None) -> list[str]:
    """The non-empty lines of the text (the first ``max_lines`` of them, if given)."""
    lines = [line for line in pathlib.Path(path).read_text("ascii").splitlines() if line]
    return lines[:max_lines] if max_lines is not None else lines


def vocabulary(lines) -> str:
    """The sorted characters of ``lines`` and the newline; character ``vocab[i]`` has id ``i``."""
    return "".join(sorted(set("".join(lines)) | {NEWLINE}))


def split_lines(lines, valid_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """``(train, valid)``: the last ``valid_fraction`` of the lines is held out."""
    cut = len(lines) - max(1, round(valid_fraction * len(lines)))
    return lines[:cut], lines[cut:]


def encode(lines, vocab: str, length: int):
    """Ids ``x (n, length)``, next-character targets ``y`` (-100 at padding) and the
    key-padding ``mask`` (True at a real position), numpy arrays.

    ``x[i] = [\\n, c_1 .. c_m, pad ...]`` and ``y[i] = [c_1 .. c_m, \\n, -100 ...]``; the
    padded inputs hold the newline's id (any id would do: nothing reads them)."""
    index = {c: i for i, c in enumerate(vocab)}
    x = np.full((len(lines), length), index[NEWLINE], np.int32)
    y = np.full((len(lines), length), IGNORE, np.int32)
    for i, line in enumerate(lines):
        if len(line) + 1 > length:
            raise ValueError(f"line {i} has {len(line)} characters; length {length} holds "
                             f"at most {length - 1}")
        unknown = sorted(set(line) - set(index))
        if unknown:
            raise ValueError(f"line {i} has characters outside the vocabulary: {unknown}")
        ids = [index[c] for c in line]
        x[i, :len(ids) + 1] = [index[NEWLINE], *ids]
        y[i, :len(ids) + 1] = [*ids, index[NEWLINE]]
    return x, y, y != IGNORE


def decode(ids, vocab: str) -> str:
    """The characters of ``ids``."""
    return "".join(vocab[int(i)] for i in ids)


def bits_per_char(logits, y) -> float:
    """``mean(-log2 softmax(logits)[y])`` over the targets that are not -100, in float64
    numpy (independent of the loss): the validation figure the script reports."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    valid = np.asarray(y) != IGNORE
    picked = np.take_along_axis(logp, np.where(valid, y, 0)[..., None], -1)[..., 0]
    return float(-picked[valid].sum() / valid.sum() / math.log(2))


# --------------------------------------------------------------------------- models


def build(kind: str, vocab_size: int, *, width: int = 64, depth: int = 2, heads: int = 4,
          hidden: int = 192, dropout: float = 0.0, **_):
    """The ``transformer`` or ``lstm`` language model: ids ``(batch, T)`` -> logits
    ``(batch, T, vocab_size)``, both reading ``mask=``."""
    if kind == "transformer":
        blocks = [L.transformer_block(heads, 4 * width, causal=True, rotary=True,
                                      dropout=dropout)
                  for _ in range(depth)]
        return L.serial(L.embedding(vocab_size, width), *blocks, L.rms_norm(),
                        L.dense(vocab_size))
    if kind == "lstm":
        return L.serial(L.embedding(vocab_size, width), L.lstm(hidden), L.dropout(dropout),
                        L.dense(vocab_size))
    raise ValueError(f"unknown model {kind!r}; expected 'transformer' or 'lstm'")


def engine_gap(model, params, x, y, mask, key, policy="f32") -> dict:
    """Loss and gradients of both engines on one training batch (dropout on, the same
    ``key``): ``{"loss": (autodiff, manual), "loss_gap": relative gap, "grad_gap": largest
    relative gap of a leaf (by its norm)}``."""
    net = precision.apply_policy(model, policy)
    out = {}
    for engine in ("autodiff", "manual"):
        vg = jax.jit(engines.get(engine).value_and_grad(net, LOSS))
        out[engine] = vg(params, x, y, key=key, mask=mask)
    (la, ga), (lm, gm) = out["autodiff"], out["manual"]
    gaps = jax.tree.leaves(jax.tree.map(
        lambda a, m: float(jnp.linalg.norm((a - m).ravel()) / (jnp.linalg.norm(a.ravel()) + 1e-30)),
        ga, gm))
    return {"loss": (float(la), float(lm)), "loss_gap": abs(float(la) - float(lm)) / float(la),
            "grad_gap": max(gaps)}


# --------------------------------------------------------------------------- sampling


def sample_by_recompute(model, params, prompt, num_tokens: int, key, *, temperature=1.0,
                        top_k=None, greedy=False):
    """Like :func:`funnn.generate.generate`, for any causal model (an LSTM has no KV cache):
    token ``i`` comes from ``model.apply`` on the whole buffer so far, at the last filled
    position, drawn with ``fold_in(key, i)``. ``num_tokens`` full forward passes, one jit."""
    b, t = prompt.shape

    @jax.jit
    def run(params, prompt, key):
        buf = jnp.zeros((b, t + num_tokens), jnp.int32).at[:, :t].set(prompt)

        def body(i, buf):
            logits = model.apply(params, buf)[:, t + i - 1]
            k = None if greedy else jax.random.fold_in(key, i)
            tok = gen.sample(logits, k, temperature=temperature, top_k=top_k, greedy=greedy)
            return buf.at[:, t + i].set(tok.astype(jnp.int32))

        return jax.lax.fori_loop(0, num_tokens, body, buf)

    return run(params, jnp.asarray(prompt, jnp.int32), key)


def sample_lines(kind: str, model, params, vocab: str, n: int, length: int, key,
                 temperature: float = 0.8, top_k: int = 10) -> list[str]:
    """``n`` lines drawn from the model, each from a lone newline up to the next newline
    (or ``length - 1`` characters)."""
    prompt = jnp.full((n, 1), vocab.index(NEWLINE), jnp.int32)
    draw = gen.generate if kind == "transformer" else sample_by_recompute
    ids = draw(model, params, prompt, length - 1, key=key, temperature=temperature,
               top_k=top_k)
    return [decode(row, vocab).split(NEWLINE, 1)[0] for row in np.asarray(ids)[:, 1:]]


# --------------------------------------------------------------------------- training


def prepare(max_lines=None, path=TEXT) -> dict:
    """The vocabulary, the padded length and the encoded ``train``/``valid`` splits, each
    ``(x, y, {"mask": mask})`` as ``fit`` takes them."""
    lines = read_lines(path, max_lines)
    vocab = vocabulary(read_lines(path))            # the whole text's, whatever the cut
    length = max(len(line) for line in lines) + 1
    train_lines, valid_lines = split_lines(lines)
    data = {}
    for name, part in (("train", train_lines), ("valid", valid_lines)):
        x, y, mask = encode(part, vocab, length)
        data[name] = (jnp.asarray(x), jnp.asarray(y), {"mask": jnp.asarray(mask)})
    return {"vocab": vocab, "length": length, **data}


def run(kind: str = "transformer", engine: str = "autodiff", policy: str = "f32", *,
        seed: int = 0, tiny: bool = False, num_samples: int = 4, log=print, **overrides):
    """Train one model and return ``{"bpc": per-epoch validation bits per character,
    "final_bpc", "uniform_bpc", "engine_gap", "samples", "seconds", "params", "model",
    "data"}``; ``overrides`` replace entries of ``DEFAULT`` (or ``TINY``)."""
    cfg = {**(TINY if tiny else DEFAULT), **overrides}
    data = prepare(cfg["max_lines"])
    vocab, length = data["vocab"], data["length"]
    model = build(kind, len(vocab), **cfg)
    k_init, k_fit, k_sample = jax.random.split(jax.random.key(seed), 3)
    _, params = model.init(k_init, (None, length))
    x, y, side = data["train"]
    bs = cfg["batch_size"]
    gap = engine_gap(model, params, x[:bs], y[:bs], side["mask"][:bs], k_fit, policy)
    log(f"{kind}, {engine} engine, precision {policy}: {x.shape[0]} training lines, "
        f"{data['valid'][0].shape[0]} held out, vocabulary {len(vocab)}, padded to {length}; "
        f"uniform = {math.log2(len(vocab)):.3f} bits/char")
    log(f"first batch: loss autodiff {gap['loss'][0]:.6f}, manual {gap['loss'][1]:.6f} "
        f"(gradients differ by {gap['grad_gap']:.1e} relative)")
    bpc = []

    def on_epoch(row):
        bpc.append(row["eval_loss"] / math.log(2))
        log(f"  epoch {row['epoch']:2d}: train {row['train_loss'] / math.log(2):.3f}, "
            f"validation {bpc[-1]:.3f} bits/char ({row['seconds']:.1f} s)")

    t0 = time.perf_counter()
    steps = cfg["epochs"] * (x.shape[0] // bs)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, cfg["learning_rate"],
                                                         min(100, steps // 10), steps),
                      weight_decay=cfg["weight_decay"])
    result = train.fit(model, params, data["train"], LOSS, opt, engine=engine,
                       epochs=cfg["epochs"], batch_size=bs, key=k_fit,
                       eval_data=data["valid"], precision=policy, progress=False,
                       on_epoch=on_epoch)
    seconds = time.perf_counter() - t0
    vx, vy, vside = data["valid"]
    final = bits_per_char(precision.apply_policy(model, policy).apply(result.params, vx,
                                                                       **vside), vy)
    samples = sample_lines(kind, model, result.params, vocab, num_samples, length, k_sample)
    log(f"validation {final:.3f} bits/char after {cfg['epochs']} epochs ({seconds:.1f} s); "
        f"samples (temperature 0.8, top-k 10):")
    for line in samples:
        log(f"  | {line}")
    return {"bpc": bpc, "final_bpc": final, "uniform_bpc": math.log2(len(vocab)),
            "engine_gap": gap, "samples": samples, "seconds": seconds,
            "params": result.params, "model": model, "data": data, "config": cfg}


def check(r: dict, max_bpc: float | None = None, policy: str = "f32") -> None:
    """The claims of the module docstring, on a :func:`run` result."""
    tol = 1e-5 if policy == "f32" else 2e-2        # bfloat16 keeps 8 bits of mantissa
    assert r["engine_gap"]["loss_gap"] < tol, r["engine_gap"]
    assert abs(r["bpc"][-1] - r["final_bpc"]) < tol * r["final_bpc"], (r["bpc"], r["final_bpc"])
    limit = r["uniform_bpc"] if max_bpc is None else max_bpc
    assert math.isfinite(r["final_bpc"]) and r["final_bpc"] < limit, (r["final_bpc"], limit)
    vocab = set(r["data"]["vocab"]) - {NEWLINE}
    assert all(set(s) <= vocab for s in r["samples"]), r["samples"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="transformer", choices=["transformer", "lstm"])
    p.add_argument("--engine", default="autodiff", choices=["autodiff", "manual"])
    p.add_argument("--precision", default="f32", choices=list(precision.POLICIES))
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--width", type=int, help="embedding and transformer width")
    p.add_argument("--depth", type=int, help="transformer blocks")
    p.add_argument("--hidden", type=int, help="LSTM state size")
    p.add_argument("--max-lines", type=int, help="use only the first lines of the text")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model on 80 lines, one epoch")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k in DEFAULT and v is not None}
    r = run(args.model, args.engine, args.precision, seed=args.seed, tiny=args.tiny,
            num_samples=args.samples, **overrides)
    check(r, None if args.tiny or overrides else 3.0, args.precision)
    return r


if __name__ == "__main__":
    main()
