"""One causal attention over a long sequence split across Dask workers (context parallelism).

q, k and v are made on the workers, chunked along the sequence; every (query chunk, key
chunk) pair that causality leaves visible is one task, and each query chunk's partial
results are merged with the log-sum-exp rule (``numba_attn.merge_states``) in a tree::

    pip install "numba_attn[distributed]"
    python examples/long_context_dask.py --seqlen 8192 --chunk 1024          # LocalCluster
    python examples/long_context_dask.py --scheduler tcp://host:8786 --seqlen 65536
    python examples/long_context_dask.py --seqlen 4096 --check   # also on this machine alone
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=1024, help="sequence chunk of q, k and v")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--scheduler", help="address of an existing Dask scheduler")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--check", action="store_true",
                    help="compare with numba_attn.attention on the whole arrays here")
    args = ap.parse_args(argv)

    import dask.array as da
    from dask.distributed import Client, LocalCluster, progress

    import numba_attn
    from numba_attn import distributed

    if args.scheduler:
        client = Client(args.scheduler)
    else:
        client = Client(LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                     dashboard_address=None, env={"NUMBA_NUM_THREADS": "1"}))
    with client:
        rng = da.random.default_rng(0)
        s, c = args.seqlen, args.chunk
        q = rng.standard_normal((1, s, args.heads, args.head_dim), dtype=np.float32,
                                chunks=(1, c, args.heads, args.head_dim))
        k, v = (rng.standard_normal((1, s, args.kv_heads, args.head_dim), dtype=np.float32,
                                    chunks=(1, c, args.kv_heads, args.head_dim))
                for _ in range(2))
        out, lse = distributed.attention(q, k, v, causal=True, return_lse=True)
        blocks = sum(1 for key in out.__dask_graph__() if "numba-attn-block" in str(key))
        n = len(q.chunks[1])
        print(f"seqlen {s} in {n} chunks: {blocks} attention tasks of {n * n} chunk pairs "
              f"(the causally invisible ones get no task)")
        t0 = time.perf_counter()
        fut = client.compute([out, lse])
        progress(fut)
        print()
        got, got_lse = client.gather(fut)
        print(f"distributed: {time.perf_counter() - t0:.2f} s on "
              f"{len(client.scheduler_info()['workers'])} workers, out {got.shape}")
        if args.check:
            qn, kn, vn = da.compute(q, k, v)
            t0 = time.perf_counter()
            want, want_lse = numba_attn.attention(qn, kn, vn, causal=True, return_lse=True)
            print(f"one machine: {time.perf_counter() - t0:.2f} s; max |diff| out "
                  f"{np.abs(got - want).max():.2e}, lse {np.abs(got_lse - want_lse).max():.2e}")


if __name__ == "__main__":
    main()
