"""Train a tiny character-level language model with numba_attn and numpy only (no torch).

The model: a character embedding, ``n_layers`` pre-norm decoder blocks (RMSNorm, causal
:class:`numba_attn.MultiHeadAttention` with rotary embeddings, RMSNorm, a ReLU MLP), a final
RMSNorm and the output projection tied to the embedding. Gradients come from
``MultiHeadAttention.backward`` (attention through :func:`numba_attn.attention_backward`),
:func:`numba_attn.rms_norm_backward` and plain numpy for the rest; Adam updates them.

The text is the opening of Chapter I of *Alice's Adventures in Wonderland* (Lewis Carroll,
1865; public domain), shipped in ``examples/data/alice_ch1.txt``. Run::

    python examples/train_tiny_lm.py --steps 300

It prints the loss under a progress bar, then a sample continuation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import numba_attn as na

TEXT = Path(__file__).with_name("data") / "alice_ch1.txt"


class TinyLM:
    """Embedding -> blocks (attention + MLP, pre-RMSNorm, residual) -> RMSNorm -> tied head."""

    def __init__(self, vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp=64, seed=0,
                 dropout_p=0.0):
        rng = np.random.default_rng(seed)
        self.dropout_p = dropout_p
        self.params = {"embed": rng.standard_normal((vocab, dim)) * 0.3,
                       "norm_f": np.ones(dim)}
        self.attn = []
        for i in range(n_layers):
            layer = na.MultiHeadAttention(dim, n_heads, n_kv_heads, rope_theta=1e4,
                                          dtype=np.float32, seed=seed + 1 + i)
            self.attn.append(layer)
            for name, value in layer.named_parameters():
                self.params[f"blocks.{i}.attn.{name}"] = value  # the layer's own arrays
            self.params[f"blocks.{i}.norm1"] = np.ones(dim)
            self.params[f"blocks.{i}.norm2"] = np.ones(dim)
            self.params[f"blocks.{i}.w1"] = rng.standard_normal((mlp, dim)) / np.sqrt(dim)
            self.params[f"blocks.{i}.w2"] = rng.standard_normal((dim, mlp)) / np.sqrt(mlp)
        for k in self.params:
            if not k.startswith("blocks.") or ".attn." not in k:
                self.params[k] = self.params[k].astype(np.float32)

    def loss_and_grads(self, tokens, seed=0):
        """Mean next-character cross-entropy of ``tokens`` (batch, seq + 1), and gradients."""
        p = self.params
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        x = p["embed"][inp]
        tape = []
        for i, layer in enumerate(self.attn):
            h1 = na.rms_norm(x, p[f"blocks.{i}.norm1"])
            kw = {}
            if self.dropout_p:
                kw = {"dropout_p": self.dropout_p, "seed": seed * 101 + i}
            a = layer.forward(h1, train=True, **kw)
            x1 = x + a
            h2 = na.rms_norm(x1, p[f"blocks.{i}.norm2"])
            u = h2 @ p[f"blocks.{i}.w1"].T
            r = np.maximum(u, 0)
            x2 = x1 + r @ p[f"blocks.{i}.w2"].T
            tape.append((x, x1, h2, u, r))
            x = x2
        hf = na.rms_norm(x, p["norm_f"])
        logits = hf @ p["embed"].T
        logits -= logits.max(axis=-1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=-1, keepdims=True)
        n = tgt.size
        loss = -float(np.mean(np.log(prob.reshape(-1, prob.shape[-1])[np.arange(n),
                                                                     tgt.reshape(-1)])))
        g = {}
        dlogits = prob
        dlogits.reshape(-1, prob.shape[-1])[np.arange(n), tgt.reshape(-1)] -= 1.0
        dlogits /= n
        g["embed"] = dlogits.reshape(-1, dlogits.shape[-1]).T @ hf.reshape(-1, hf.shape[-1])
        dhf = dlogits @ p["embed"]
        dx, g["norm_f"] = na.rms_norm_backward(dhf, x, p["norm_f"])
        for i in reversed(range(len(self.attn))):
            x0, x1, h2, u, r = tape[i]
            w1, w2 = p[f"blocks.{i}.w1"], p[f"blocks.{i}.w2"]
            g[f"blocks.{i}.w2"] = dx.reshape(-1, dx.shape[-1]).T @ r.reshape(-1, r.shape[-1])
            du = (dx @ w2) * (u > 0)
            g[f"blocks.{i}.w1"] = du.reshape(-1, du.shape[-1]).T @ h2.reshape(-1, h2.shape[-1])
            dh2 = du @ w1
            dn, g[f"blocks.{i}.norm2"] = na.rms_norm_backward(dh2, x1, p[f"blocks.{i}.norm2"])
            dx1 = dx + dn
            da, lg = self.attn[i].backward(dx1)
            for name, val in lg.items():
                g[f"blocks.{i}.attn.{name}"] = val
            dh1, g[f"blocks.{i}.norm1"] = na.rms_norm_backward(da, x0, p[f"blocks.{i}.norm1"])
            dx = dx1 + dh1
        np.add.at(g["embed"], inp.reshape(-1), dx.reshape(-1, dx.shape[-1]))
        return loss, g


class Adam:
    def __init__(self, params, lr=3e-3, betas=(0.9, 0.99), eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            params[k] -= (self.lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)
                          ).astype(params[k].dtype)  # in place: layers see the update


def _bar(i, n, loss, width=30):
    done = int(width * (i + 1) / n)
    return f"\r[{'#' * done}{'.' * (width - done)}] step {i + 1}/{n} loss {loss:.3f}"


def train(steps=300, batch=16, seq=48, lr=3e-3, seed=0, dropout_p=0.0, out=sys.stdout,
          **model_kw):
    """Train on the shipped text; returns (model, chars, list of losses)."""
    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int64)
    model = TinyLM(len(chars), seed=seed, dropout_p=dropout_p, **model_kw)
    opt = Adam(model.params, lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        tokens = np.stack([ids[s:s + seq + 1] for s in starts])
        loss, grads = model.loss_and_grads(tokens, seed=step)
        opt.step(model.params, grads)
        losses.append(loss)
        if out is not None:
            out.write(_bar(step, steps, loss))
            out.flush()
    if out is not None:
        out.write("\n")
    return model, chars, losses


def sample(model, chars, prompt="Alice ", n=80):
    """Greedy continuation of ``prompt`` (recomputes the whole prefix each step)."""
    ids = [chars.index(c) for c in prompt if c in chars]
    for _ in range(n):
        tok = np.array([ids + [0]])
        p = model.params
        x = p["embed"][tok[:, :-1]]
        for i, layer in enumerate(model.attn):
            x = x + layer(na.rms_norm(x, p[f"blocks.{i}.norm1"]))
            h2 = na.rms_norm(x, p[f"blocks.{i}.norm2"])
            x = x + np.maximum(h2 @ p[f"blocks.{i}.w1"].T, 0) @ p[f"blocks.{i}.w2"].T
        logits = na.rms_norm(x, p["norm_f"])[0, -1] @ p["embed"].T
        ids.append(int(np.argmax(logits)))
    return "".join(chars[i] for i in ids)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dropout", type=float, default=0.0)
    args = ap.parse_args(argv)
    model, chars, losses = train(args.steps, args.batch, args.seq, args.lr,
                                 dropout_p=args.dropout)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(sample(model, chars))


if __name__ == "__main__":
    main()
