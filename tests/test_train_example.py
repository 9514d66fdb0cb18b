"""examples/train_tiny_lm.py: a short schedule must bring the loss well below its start."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("train_tiny_lm",
                                                  ROOT / "examples" / "train_tiny_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_lm_loss_falls_with_a_progress_bar():
    ex = _example()
    out = io.StringIO()
    model, chars, losses = ex.train(steps=40, batch=8, seq=32, lr=5e-3, dropout_p=0.1, out=out)
    assert "step 40/40" in out.getvalue()
    # the start is about log(vocabulary) or above; 40 Adam steps reach well below it
    assert losses[0] > 0.9 * np.log(len(chars))
    assert np.mean(losses[-5:]) < 0.75 * losses[0]
    text = ex.sample(model, chars, n=5)
    assert len(text) == len("Alice ") + 5
