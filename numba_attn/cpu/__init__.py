"""``@njit`` CPU kernels and the CPU backend (registered with numba_attn.backends on
import). Kernels and their launch helpers only: no argument checking."""
from __future__ import annotations

from .. import backends as _be


class CPUBackend(_be.Backend):
    """The fused CPU kernels: ``launch.forward`` (the dropout forward and the backward of
    ``backward``), ``launch.merge_states``."""

    name = "cpu"
    device = "cpu"
    operations = frozenset({"forward", "backward", "merge"})

    def run(self, problem):
        if "dropout" in problem.extra:  # its own kernel: dropout_p = 0 runs the unchanged one
            from . import backward

            return backward.forward_dropout(problem, *problem.extra["dropout"])
        from . import launch

        return launch.forward(problem)

    def backward(self, problem, dout, out, lse, dropout_p, seed, bias_shape):
        from . import backward

        return backward.backward(problem, dout, out, lse, dropout_p, seed, bias_shape)

    def merge(self, out_a, lse_a, out_b, lse_b):
        from . import launch

        return launch.merge_states(out_a, lse_a, out_b, lse_b)


_be.register_backend(CPUBackend())
