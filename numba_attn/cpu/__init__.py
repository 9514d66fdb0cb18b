"""``@njit`` CPU kernels and the CPU backend (registered with numba_attn.dispatch on
import). Kernels and their launch helpers only: no argument checking."""
from __future__ import annotations

from .. import dispatch as _dp


class CPUBackend(_dp.Backend):
    """The fused CPU kernels (``launch.forward``; the dropout forward of ``backward``)."""

    name = "cpu"
    device = "cpu"

    def run(self, problem):
        if "dropout" in problem.extra:  # its own kernel: dropout_p = 0 runs the unchanged one
            from . import backward

            return backward.forward_dropout(problem, *problem.extra["dropout"])
        from . import launch

        return launch.forward(problem)


_dp.register_backend(CPUBackend())
