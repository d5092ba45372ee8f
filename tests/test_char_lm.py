"""examples/char_lm.py: the shipped text, padded and masked lines, bits per character by hand,
and tiny runs of the transformer and the LSTM (both engines' first-batch loss, bf16, samples).
"""

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from example_loader import EXAMPLES, load

ex = load("char_lm")


def test_the_text_ships_with_its_provenance():
    text = ex.TEXT.read_bytes()
    readme = (EXAMPLES / "data" / "README.md").read_text()
    assert hashlib.sha256(text).hexdigest() in readme        # the file the note describes
    lines = ex.read_lines()
    assert len(lines) == 1685 and lines[0] == "First Citizen:"
    assert lines[-1] == "I know, they do attend us."
    vocab = ex.vocabulary(lines)
    assert vocab[0] == "\n" and len(vocab) == 59 and vocab == "".join(sorted(set(vocab)))
    train, valid = ex.split_lines(lines)
    assert train + valid == lines and len(valid) == round(0.1 * len(lines))


def test_encode_pads_and_masks_lines_by_hand():
    vocab = "\nab"                                      # ids: newline 0, a 1, b 2
    x, y, mask = ex.encode(["ab", "b", "bba"], vocab, 5)
    np.testing.assert_array_equal(x, [[0, 1, 2, 0, 0], [0, 2, 0, 0, 0], [0, 2, 2, 1, 0]])
    np.testing.assert_array_equal(y, [[1, 2, 0, -100, -100], [2, 0, -100, -100, -100],
                                      [2, 2, 1, 0, -100]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    assert ex.decode(x[2, 1:4], vocab) == "bba"
    with pytest.raises(ValueError, match="4 characters; length 4 holds at most 3"):
        ex.encode(["abab"], vocab, 4)
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['c'\]"):
        ex.encode(["abc"], vocab, 5)


def test_bits_per_char_by_hand_and_equal_to_the_masked_loss():
    """Probabilities 1/2 and 1/4 at the two real targets: (1 + 2) / 2 = 1.5 bits; the ignored
    position's logits (huge, and its target -100) change nothing."""
    logits = np.array([[np.log([0.5, 0.25, 0.25]) + 7.0, np.log([0.25, 0.25, 0.5]),
                        [1e6, -1e6, 3.0]]])
    y = np.array([[0, 1, -100]])
    assert ex.bits_per_char(logits, y) == pytest.approx(1.5, abs=1e-12)
    nats = ex.LOSS.value(jnp.asarray(logits, jnp.float32), jnp.asarray(y))
    assert float(nats) / math.log(2) == pytest.approx(1.5, rel=1e-6)


@pytest.mark.slow      # ~15-18 CPU-s: both engines, an epoch, generation (compiles)
def test_tiny_transformer_learns_and_generates():
    r = ex.run("transformer", tiny=True, log=lambda s: None)
    ex.check(r)                              # finite, below uniform, samples from the vocabulary
    assert r["engine_gap"]["loss_gap"] < 1e-6 and r["engine_gap"]["grad_gap"] < 1e-4
    assert 0 < r["final_bpc"] < r["uniform_bpc"] - 0.2
    assert r["uniform_bpc"] == pytest.approx(math.log2(59))
    assert len(r["samples"]) == 4 and any(r["samples"])
    # the KV-cache decoder and re-running the whole prefix give the same greedy lines
    prompt = jnp.zeros((2, 3), jnp.int32).at[:, 1].set(5)
    from funnn import generate
    cached = generate.generate(r["model"], r["params"], prompt, 8, greedy=True)
    full = ex.sample_by_recompute(r["model"], r["params"], prompt, 8, None, greedy=True)
    np.testing.assert_array_equal(cached, full)


@pytest.mark.slow      # ~7 CPU-s
def test_tiny_lstm_runs_with_the_manual_engine_under_bf16(capsys):
    r = ex.main(["--tiny", "--model", "lstm", "--engine", "manual", "--precision", "bf16"])
    out = capsys.readouterr().out
    assert "lstm, manual engine, precision bf16" in out and "bits/char" in out
    assert r["engine_gap"]["loss_gap"] < 2e-2
    assert math.isfinite(r["final_bpc"]) and r["final_bpc"] < r["uniform_bpc"]
    master = str(jnp.zeros(()).dtype)           # float64 here (conftest turns on x64)
    assert {str(a.dtype) for a in jax.tree.leaves(r["params"])} == {master}   # not bfloat16
