"""``@njit`` CPU kernels. Kernels and their launch helpers only: no argument checking."""
