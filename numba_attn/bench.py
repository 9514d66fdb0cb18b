"""Benchmark shapes, peers and timing shared by ``python -m numba_attn bench`` and asv.

The shapes are named after the models they come from; the peers are plain numpy
(matmul + softmax per head, float32) and, when it is installed, PyTorch's
``scaled_dot_product_attention``. Nothing here imports torch until a torch peer is
asked for; the library itself never imports it.

FLOPs count ``2 * head_dim + 2 * head_dim_v`` per visible (query, key) pair and head
(``q . k`` and ``p @ v``, a multiply-add being two), with the visible pairs counted
exactly, so causal rows are not simply halved.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["Shape", "SHAPES", "QUICK_SHAPES", "visible_pairs", "flops", "make_inputs",
           "numba_attn_call", "numpy_peer", "numpy_peer_reason", "torch_peer",
           "torch_peer_reason", "time_call", "sgemm_gflops", "read_bandwidth_gbs",
           "run_bench"]

SEED = 20240601
NUMPY_SCORES_LIMIT = 256 * 2**20  # bytes of one head's (Sq, Sk) float32 score matrix


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: BSHD float32 inputs for :func:`numba_attn.attention`."""

    name: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    kind: str = "prefill"  # "prefill" (compute bound) or "decode" (bandwidth bound)

    @property
    def label(self):
        hk = "" if self.num_kv_heads == self.num_heads else f"/{self.num_kv_heads}"
        c = " causal" if self.causal else ""
        return (f"B{self.batch} H{self.num_heads}{hk} Sq{self.seqlen_q} Sk{self.seqlen_k} "
                f"D{self.head_dim}{c}")


def _decode(name, sk):
    return Shape(name, 1, 1, sk, 32, 8, 128, False, "decode")


SHAPES = (
    Shape("gpt2_prefill_2k", 1, 2048, 2048, 16, 16, 64, False),
    Shape("gpt2_prefill_2k_causal", 1, 2048, 2048, 16, 16, 64, True),
    Shape("llama3_8b_prefill_4k_gqa", 1, 4096, 4096, 32, 8, 128, True),
    Shape("long_16k", 1, 16384, 16384, 8, 8, 64, True),
    _decode("llama3_8b_decode_4k", 4096),
    _decode("llama3_8b_decode_16k", 16384),
)

QUICK_SHAPES = (
    Shape("gpt2_prefill_512", 1, 512, 512, 16, 16, 64, False),
    Shape("gpt2_prefill_512_causal", 1, 512, 512, 16, 16, 64, True),
    Shape("llama3_8b_prefill_1k_gqa", 1, 1024, 1024, 32, 8, 128, True),
    Shape("long_4k", 1, 4096, 4096, 8, 8, 64, True),
    _decode("llama3_8b_decode_4k", 4096),
)


def visible_pairs(seqlen_q, seqlen_k, causal):
    """Number of visible (query, key) pairs of one head, bottom-right causal alignment.

    >>> visible_pairs(4, 4, False), visible_pairs(4, 4, True), visible_pairs(2, 5, True)
    (16, 10, 9)
    """
    if not causal:
        return seqlen_q * seqlen_k
    i = np.arange(seqlen_q, dtype=np.int64)
    return int(np.clip(i + (seqlen_k - seqlen_q) + 1, 0, seqlen_k).sum())


def flops(shape: Shape):
    """Floating-point operations of one forward call (QK^T and PV, visible pairs only)."""
    pairs = visible_pairs(shape.seqlen_q, shape.seqlen_k, shape.causal)
    return 4 * shape.batch * shape.num_heads * shape.head_dim * pairs


def kv_bytes(shape: Shape):
    """Bytes of K and V read by one call (float32): the floor of a decode step's traffic."""
    return 2 * shape.batch * shape.seqlen_k * shape.num_kv_heads * shape.head_dim * 4


def make_inputs(shape: Shape, seed=SEED, dtype=np.float32):
    """Seeded q (B, Sq, H, D), k and v (B, Sk, Hkv, D)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((shape.batch, shape.seqlen_q, shape.num_heads, shape.head_dim),
                            dtype=np.float32).astype(dtype, copy=False)
    kv = (shape.batch, shape.seqlen_k, shape.num_kv_heads, shape.head_dim)
    k = rng.standard_normal(kv, dtype=np.float32).astype(dtype, copy=False)
    v = rng.standard_normal(kv, dtype=np.float32).astype(dtype, copy=False)
    return q, k, v


def numba_attn_call(shape: Shape, q, k, v):
    """A no-argument callable running numba_attn on the inputs.

    Prefill shapes call :func:`numba_attn.attention`; decode shapes call
    :func:`numba_attn.attention_with_kvcache` over a :class:`numba_attn.KVCache` filled
    with ``k``/``v`` (no append, so every call reads the same cache), or plain attention
    with ``seqlen_q = 1`` where the cache API is absent (the same kernel).
    """
    import numba_attn

    causal = shape.causal
    if shape.kind == "decode" and hasattr(numba_attn, "attention_with_kvcache"):
        b, sk, hkv, d = k.shape
        cache = numba_attn.KVCache(b, sk, hkv, d, dtype=k.dtype)
        cache.k[...] = k
        cache.v[...] = v
        cache.seqlens = np.full(b, sk, np.int32)

        def decode():
            return numba_attn.attention_with_kvcache(q, cache, causal=causal)
        return decode

    def call():
        return numba_attn.attention(q, k, v, causal=causal)
    return call


# ---------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------
def numpy_peer_reason(shape: Shape):
    """Why the numpy peer is skipped for ``shape`` (None when it runs)."""
    nbytes = shape.seqlen_q * shape.seqlen_k * 4
    if nbytes > NUMPY_SCORES_LIMIT:
        return (f"numpy peer skipped: one head's {shape.seqlen_q} x {shape.seqlen_k} score "
                f"matrix is {nbytes / 2**30:.1f} GiB")
    return None


def numpy_peer(shape: Shape, q, k, v):
    """numpy attention (float32 matmul + softmax, one head at a time) as a callable.

    Layout changes (BSHD -> per-head contiguous) happen here, outside the timed call.
    """
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    qh = np.ascontiguousarray(q.transpose(0, 2, 1, 3))  # (B, H, Sq, D)
    kt = np.ascontiguousarray(k.transpose(0, 2, 3, 1))  # (B, Hkv, D, Sk)
    vh = np.ascontiguousarray(v.transpose(0, 2, 1, 3))  # (B, Hkv, Sk, D)
    scale = np.float32(1.0 / np.sqrt(d))
    neg = None
    if shape.causal:
        i = np.arange(sq)[:, None] + (sk - sq)
        neg = np.where(np.arange(sk)[None, :] <= i, 0.0, -np.inf).astype(np.float32)
    scores = np.empty((sq, sk), np.float32)
    out = np.empty((b, sq, h, v.shape[3]), np.float32)

    def call():
        s = scores
        for bi in range(b):
            for hi in range(h):
                np.matmul(qh[bi, hi], kt[bi, hi // group], out=s)
                s *= scale
                if neg is not None:
                    s += neg
                s -= s.max(axis=1, keepdims=True)
                np.exp(s, out=s)
                o = s @ vh[bi, hi // group]
                o /= s.sum(axis=1, keepdims=True)
                out[bi, :, hi] = o
        return out
    return call


def torch_peer_reason():
    """Why the torch peer is skipped (None when torch imports)."""
    try:
        import torch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"torch peer skipped: {type(e).__name__}: {e}"
    return None


def torch_peer(shape: Shape, q, k, v, threads=None):
    """``torch.nn.functional.scaled_dot_product_attention`` on BHSD copies, as a callable.

    ``torch.set_num_threads(threads)`` (default: numba's thread count) so both engines
    use the same cores; ``enable_gqa=True`` for grouped heads.
    """
    import numba
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads or numba.get_num_threads())
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
                  for x in (q, k, v))
    # torch's is_causal is top-left aligned; equal to ours (bottom-right) when Sq == Sk
    is_causal = bool(shape.causal)
    if is_causal and shape.seqlen_q != shape.seqlen_k:
        raise NotImplementedError("torch peer: causal with seqlen_q != seqlen_k differs")
    kw = {"enable_gqa": True} if shape.num_kv_heads != shape.num_heads else {}

    def call():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=is_causal, **kw)
    return call


# ---------------------------------------------------------------------------------------
# timing and machine peaks
# ---------------------------------------------------------------------------------------
def time_call(fn, *, min_repeats=3, max_repeats=20, target_s=1.0, budget_s=15.0):
    """Median seconds of ``fn()`` after one untimed warm-up call.

    Repeats until ``min_repeats`` and ``target_s`` of samples are reached, at most
    ``max_repeats`` samples, and stops early (with at least one sample) past ``budget_s``.
    Returns (median seconds, warm-up seconds, number of samples).
    """
    t0 = time.perf_counter()
    fn()  # warm-up: JIT compile / cache load, thread pools, first-touch pages
    warm = time.perf_counter() - t0
    samples = []
    while len(samples) < max_repeats:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        total = sum(samples)
        if len(samples) >= min_repeats and total >= target_s:
            break
        if total >= budget_s:
            break
    return statistics.median(samples), warm, len(samples)


def best_seconds(fn, repeats=7):
    """Fastest of ``repeats`` timed calls after a warm-up call (a peak, not a typical)."""
    fn()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sgemm_gflops(n=4096, repeats=3):
    """numpy float32 ``n^3`` matmul throughput (GFLOP/s, best of ``repeats``), all BLAS
    threads: the machine's sgemm peak."""
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    return 2.0 * n**3 / best_seconds(lambda: np.matmul(a, b, out=c), repeats) / 1e9


def read_bandwidth_gbs(nbytes=512 * 2**20, repeats=5):
    """Streaming read bandwidth (GB/s, best of ``repeats``): a float32 matrix-vector
    product (BLAS sgemv, all threads) over ``nbytes`` of matrix, which is memory bound."""
    cols = 1024
    rows = nbytes // (4 * cols)
    a = np.ones((rows, cols), np.float32)
    x = np.ones(cols, np.float32)
    y = np.empty(rows, np.float32)
    return a.nbytes / best_seconds(lambda: np.matmul(a, x, out=y), repeats) / 1e9


# ---------------------------------------------------------------------------------------
# the bench command
# ---------------------------------------------------------------------------------------
class Progress:
    """A plain-text progress bar on stderr (redrawn in place on a terminal)."""

    def __init__(self, total, stream=None, width=24):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def step(self, what):
        """Announce the step about to run (``what``) and advance after it."""
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s "
                f"{what}")
        if self.tty:
            self.stream.write("\r" + line[:100].ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.done += 1

    def close(self):
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
        self.stream.write(f"bench: done in {time.perf_counter() - self.t0:.1f}s\n")
        self.stream.flush()


def _fmt_ratio(peer_ms, ms):
    return f"{peer_ms / ms:.2f}x" if peer_ms and ms else "-"


def run_bench(quick=False, name_filter=None, peers=("numpy", "torch"), out=None,
              err=None):
    """Time every selected shape for numba_attn and each peer; print a table.

    Returns a list of result dicts (one per shape). ``ratio`` columns are
    ``peer ms / numba_attn ms``: above 1 means numba_attn is faster.
    """
    import numba

    out = out or sys.stdout
    shapes = [s for s in (QUICK_SHAPES if quick else SHAPES)
              if not name_filter or name_filter in s.name]
    if not shapes:
        names = ", ".join(s.name for s in (QUICK_SHAPES if quick else SHAPES))
        raise SystemExit(f"bench: no shape matches --filter {name_filter!r}; shapes: {names}")
    timing = (dict(min_repeats=3, max_repeats=10, target_s=0.3, budget_s=3.0) if quick
              else dict(min_repeats=3, max_repeats=20, target_s=2.0, budget_s=20.0))
    notes = []
    peer_list = []
    if "numpy" in peers:
        peer_list.append("numpy")
    if "torch" in peers:
        why = torch_peer_reason()
        if why:
            notes.append(why)
        else:
            peer_list.append("torch")
    if any(s.kind == "decode" for s in shapes):
        import numba_attn

        how = ("numba_attn.attention_with_kvcache over a filled KVCache (no append)"
               if hasattr(numba_attn, "attention_with_kvcache") else
               "numba_attn.attention with seqlen_q = 1")
        notes.append(f"decode rows: {how}; peers get the same K/V as plain arrays")
    threads = numba.get_num_threads()
    prog = Progress(2 + len(shapes) * (1 + len(peer_list)), stream=err)
    prog.step("sgemm peak (numpy float32 matmul)")
    n = 2048 if quick else 4096
    peak = sgemm_gflops(n)
    prog.step("read bandwidth (float32 sgemv)")
    bw = read_bandwidth_gbs(256 * 2**20 if quick else 1024 * 2**20)
    results = []
    for shape in shapes:
        q, k, v = make_inputs(shape)
        prog.step(f"{shape.name}: numba_attn")
        ms, warm, nrep = time_call(numba_attn_call(shape, q, k, v), **timing)
        row = {"shape": shape, "ms": ms * 1e3, "first_call_s": warm, "repeats": nrep,
               "gflops": flops(shape) / ms / 1e9, "peers": {}}
        for peer in peer_list:
            prog.step(f"{shape.name}: {peer}")
            try:
                if peer == "numpy":
                    why = numpy_peer_reason(shape)
                    if why:
                        notes.append(f"{shape.name}: {why}")
                        continue
                    fn = numpy_peer(shape, q, k, v)
                else:
                    fn = torch_peer(shape, q, k, v, threads)
            except NotImplementedError as e:
                notes.append(f"{shape.name}: {e}")
                continue
            pms, _, _ = time_call(fn, **timing)
            row["peers"][peer] = pms * 1e3
        results.append(row)
    prog.close()
    _print_table(results, peer_list, peak, bw, threads, n, quick, notes, out)
    return results


def _print_table(results, peer_list, peak, bw, threads, n, quick, notes, out):
    import numba

    w = out.write
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region ran
        layer = f"{numba.config.THREADING_LAYER} requested"
    w(f"\nbench ({'quick' if quick else 'full'}): float32, numba threads = {threads} "
      f"(layer {layer}), median of repeats after a warm-up call\n")
    w(f"machine: sgemm peak {peak:.1f} GFLOP/s (numpy {n}^3 float32 matmul, best of 3); "
      f"read bandwidth {bw:.1f} GB/s (float32 sgemv, best of 5)\n\n")
    head = ["shape", "problem", "ms", "GFLOP/s", "of peak"]
    for p in peer_list:
        head += [f"{p} ms", f"vs {p}"]
    rows = []
    for r in results:
        s = r["shape"]
        if s.kind == "decode":
            frac = f"{kv_bytes(s) / (r['ms'] / 1e3) / 1e9 / bw:.0%} bw"
        else:
            frac = f"{r['gflops'] / peak:.0%} sgemm"
        line = [s.name, s.label, f"{r['ms']:.2f}", f"{r['gflops']:.1f}", frac]
        for p in peer_list:
            pm = r["peers"].get(p)
            line += [f"{pm:.2f}" if pm else "skip", _fmt_ratio(pm, r["ms"])]
        rows.append(line)
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{wd}}}" for i, wd in enumerate(widths))
    w(fmt.format(*head) + "\n")
    w("  ".join("-" * wd for wd in widths) + "\n")
    for line in rows:
        w(fmt.format(*line) + "\n")
    w("\n'vs <peer>' = peer ms / numba_attn ms (above 1: numba_attn is faster). 'of peak': "
      "prefill GFLOP/s over the sgemm peak; decode K+V bytes/s over the read bandwidth.\n")
    over = [(r["first_call_s"] - r["ms"] / 1e3, r["shape"].name) for r in results]
    extra, name = max(over)
    w(f"first-call overhead (JIT compile or cache load; first call minus median): "
      f"{max(extra, 0.0):.2f}s at most ({name})\n")
    for note in notes:
        w(f"note: {note}\n")
    out.flush()
