"""``@njit`` CPU kernels and the CPU backend (registered with numba_attn.backends on
import). Kernels and their launch helpers only: no argument checking."""
from __future__ import annotations

from .. import backends as _be


class CPUBackend(_be.Backend):
    """The fused CPU kernels through their launchers in ``launch``: ``forward``,
    ``forward_dropout`` and ``backward`` (kernels of ``backward.py``), ``merge_states``,
    ``rotary``, ``rms_norm``."""

    name = "cpu"
    device = "cpu"
    operations = frozenset({"forward", "backward", "merge", "rotary", "norm"})
    reads_quantized_kv = True

    def run(self, problem):
        from . import launch

        if "dropout" in problem.extra:  # its own kernel: dropout_p = 0 runs the unchanged one
            return launch.forward_dropout(problem, *problem.extra["dropout"])
        return launch.forward(problem)

    def backward(self, problem, dout, out, lse, dropout_p, seed, bias_shape):
        from . import launch

        return launch.backward(problem, dout, out, lse, dropout_p, seed, bias_shape)

    def merge(self, out_a, lse_a, out_b, lse_b):
        from . import launch

        return launch.merge_states(out_a, lse_a, out_b, lse_b)

    def rotary(self, x, cos, sin, pos, interleaved, out):
        from . import launch

        return launch.rotary(x, cos, sin, pos, interleaved, out)

    def rms_norm(self, x, weight, eps, out):
        from . import launch

        return launch.rms_norm(x, weight, eps, out)


_be.register_backend(CPUBackend())
