"""asv suites of numba_attn (see asv.conf.json); shared pieces live in common.py."""
