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

__all__ = ["Shape", "SHAPES", "QUICK_SHAPES", "visible_pairs", "flops", "kv_bytes",
           "storage_dtype", "make_inputs", "numba_attn_call", "numpy_peer",
           "numpy_peer_reason", "peer_shape_reason", "torch_peer", "torch_peer_reason",
           "time_call", "time_samples", "spread_note", "busy_note", "CpuShare", "best_seconds",
           "fma_peak_gflops", "stream_read_seconds", "sgemm_gflops", "run_bench"]

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
    kind: str = "prefill"  # "prefill" (compute bound), "decode" (bandwidth bound) or
    #                        "backward" (attention_backward of a prefill)
    dtype: str = "float32"  # of q, k, v (prefill) or of the KV cache (decode: q float32)
    after_matmul: bool = False  # a 512 x 512 numpy matmul (untimed) before every call

    @property
    def label(self):
        hk = "" if self.num_kv_heads == self.num_heads else f"/{self.num_kv_heads}"
        c = " causal" if self.causal else ""
        dt = "" if self.dtype == "float32" else (
            f" {self.dtype} cache" if self.kind == "decode" else f" {self.dtype}")
        mm = " after matmul" if self.after_matmul else ""
        bw = " backward" if self.kind == "backward" else ""
        return (f"B{self.batch} H{self.num_heads}{hk} Sq{self.seqlen_q} Sk{self.seqlen_k} "
                f"D{self.head_dim}{c}{dt}{mm}{bw}")


def _decode(name, sk, **kw):
    return Shape(name, 1, 1, sk, 32, 8, 128, False, "decode", **kw)


SHAPES = (
    Shape("gpt2_prefill_2k", 1, 2048, 2048, 16, 16, 64, False),
    Shape("gpt2_prefill_2k_causal", 1, 2048, 2048, 16, 16, 64, True),
    Shape("llama3_8b_prefill_4k_gqa", 1, 4096, 4096, 32, 8, 128, True),
    Shape("long_16k", 1, 16384, 16384, 8, 8, 64, True),
    Shape("gpt2_prefill_1k_float64", 1, 1024, 1024, 16, 16, 64, False, dtype="float64"),
    _decode("llama3_8b_decode_4k", 4096),
    _decode("llama3_8b_decode_4k_after_matmul", 4096, after_matmul=True),
    _decode("llama3_8b_decode_4k_float16", 4096, dtype="float16"),
    _decode("llama3_8b_decode_4k_bfloat16", 4096, dtype="bfloat16"),
    _decode("llama3_8b_decode_16k", 16384),
    _decode("llama3_8b_decode_16k_float16", 16384, dtype="float16"),
    _decode("llama3_8b_decode_16k_bfloat16", 16384, dtype="bfloat16"),
    Shape("gpt2_backward_2k", 1, 2048, 2048, 16, 16, 64, False, "backward"),
    Shape("gpt2_backward_2k_causal", 1, 2048, 2048, 16, 16, 64, True, "backward"),
)

QUICK_SHAPES = (
    Shape("gpt2_prefill_512", 1, 512, 512, 16, 16, 64, False),
    Shape("gpt2_prefill_512_causal", 1, 512, 512, 16, 16, 64, True),
    Shape("llama3_8b_prefill_1k_gqa", 1, 1024, 1024, 32, 8, 128, True),
    Shape("long_4k", 1, 4096, 4096, 8, 8, 64, True),
    Shape("gpt2_prefill_512_float64", 1, 512, 512, 16, 16, 64, False, dtype="float64"),
    _decode("llama3_8b_decode_4k", 4096),
    _decode("llama3_8b_decode_4k_after_matmul", 4096, after_matmul=True),
    _decode("llama3_8b_decode_4k_float16", 4096, dtype="float16"),
    _decode("llama3_8b_decode_4k_bfloat16", 4096, dtype="bfloat16"),
    Shape("gpt2_backward_512", 1, 512, 512, 16, 16, 64, False, "backward"),
    Shape("gpt2_backward_512_causal", 1, 512, 512, 16, 16, 64, True, "backward"),
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
    """Floating-point operations of one call, visible pairs only: a forward does QK^T and
    PV; a backward QK^T again, dP = dO V^T, dV += P^T dO, dQ += dS K, dK += dS^T Q
    (2.5x a forward)."""
    pairs = visible_pairs(shape.seqlen_q, shape.seqlen_k, shape.causal)
    fwd = 4 * shape.batch * shape.num_heads * shape.head_dim * pairs
    return fwd * 5 // 2 if shape.kind == "backward" else fwd


def storage_dtype(shape: Shape):
    """numpy dtype of the shape's K/V (bfloat16 through ml_dtypes)."""
    if shape.dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(shape.dtype)


def kv_bytes(shape: Shape):
    """Bytes of K and V read by one call: the floor of a decode step's traffic."""
    return (2 * shape.batch * shape.seqlen_k * shape.num_kv_heads * shape.head_dim
            * storage_dtype(shape).itemsize)


def make_inputs(shape: Shape, seed=SEED, dtype=None):
    """Seeded q (B, Sq, H, D), k and v (B, Sk, Hkv, D): the shape's dtype (decode: q stays
    float32 over a half-precision cache, the usual CPU inference setup)."""
    rng = np.random.default_rng(seed)
    kvdt = np.dtype(dtype) if dtype is not None else storage_dtype(shape)
    qdt = np.float32 if shape.kind == "decode" and kvdt.itemsize == 2 else kvdt
    q = rng.standard_normal((shape.batch, shape.seqlen_q, shape.num_heads, shape.head_dim),
                            dtype=np.float32).astype(qdt, copy=False)
    kv = (shape.batch, shape.seqlen_k, shape.num_kv_heads, shape.head_dim)
    k = rng.standard_normal(kv, dtype=np.float32).astype(kvdt, copy=False)
    v = rng.standard_normal(kv, dtype=np.float32).astype(kvdt, copy=False)
    return q, k, v


class _Timed:
    """A benchmark callable with an untimed ``before()`` run ahead of every timed call."""

    def __init__(self, fn, before=None):
        self.fn = fn
        self.before = before

    def __call__(self):
        return self.fn()


def _matmul_before(n=512):
    """A numpy float32 ``n x n`` matmul: leaves numpy's BLAS workers spinning (as a
    scientific script would just before its attention call)."""
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)
    return lambda: np.matmul(a, a, out=c)


def numba_attn_call(shape: Shape, q, k, v):
    """A no-argument callable running numba_attn on the inputs.

    Prefill shapes call :func:`numba_attn.attention`; decode shapes call
    :func:`numba_attn.attention_with_kvcache` over a :class:`numba_attn.KVCache` filled
    with ``k``/``v`` (no append, so every call reads the same cache), or plain attention
    with ``seqlen_q = 1`` where the cache API is absent (the same kernel).
    """
    import numba_attn

    causal = shape.causal
    before = _matmul_before() if shape.after_matmul else None
    if shape.kind == "decode" and hasattr(numba_attn, "attention_with_kvcache"):
        b, sk, hkv, d = k.shape
        cache = numba_attn.KVCache(b, sk, hkv, d, dtype=k.dtype)
        cache.k[...] = k
        cache.v[...] = v
        cache.seqlens = np.full(b, sk, np.int32)

        def decode():
            return numba_attn.attention_with_kvcache(q, cache, causal=causal)
        return _Timed(decode, before)

    if shape.kind == "backward":
        out, lse = numba_attn.attention(q, k, v, causal=causal, return_lse=True)
        dout = np.random.default_rng(SEED + 1).standard_normal(out.shape).astype(out.dtype)

        def backward():
            return numba_attn.attention_backward(dout, q, k, v, out, lse, causal=causal)
        return _Timed(backward, before)

    def call():
        return numba_attn.attention(q, k, v, causal=causal)
    return _Timed(call, before)


# ---------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------
def peer_shape_reason(shape: Shape):
    """Why no peer runs ``shape`` at all (None when they do): rows that are compared with
    numba_attn's own float32 / undisturbed row instead."""
    if shape.after_matmul:
        return "compared with the same decode without the matmul (derived ratios below)"
    if shape.kind == "decode" and storage_dtype(shape).itemsize == 2:
        return ("float32 q over a half cache has no peer; compared with the float32 cache "
                "(derived ratios below)")
    return None


def numpy_peer_reason(shape: Shape):
    """Why the numpy peer is skipped for ``shape`` (None when it runs)."""
    why = peer_shape_reason(shape)
    if why:
        return why
    if shape.kind == "backward":
        return "numpy peer: no backward (compared with torch's autograd)"
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
    if shape.kind == "backward":  # autograd of SDPA: the forward graph built once, untimed
        tq, tk, tv = (x.requires_grad_() for x in (tq, tk, tv))
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=is_causal, **kw)
        dout = torch.from_numpy(np.random.default_rng(SEED + 1).standard_normal(
            tuple(out.shape)).astype(q.dtype))

        def backward():
            return torch.autograd.grad(out, (tq, tk, tv), dout, retain_graph=True)
        return backward

    def call():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=is_causal, **kw)
    return call


# ---------------------------------------------------------------------------------------
# timing and machine peaks
# ---------------------------------------------------------------------------------------
def time_samples(fn, *, min_repeats=3, max_repeats=20, target_s=1.0, budget_s=15.0):
    """Seconds of each timed ``fn()`` after one untimed warm-up call.

    Repeats until ``min_repeats`` and ``target_s`` of samples are reached, at most
    ``max_repeats`` samples, and stops early (with at least one sample) past ``budget_s``.
    ``fn.before()``, where present, runs untimed before each sample.
    Returns (list of sample seconds, warm-up seconds).
    """
    before = getattr(fn, "before", None)
    t0 = time.perf_counter()
    fn()  # warm-up: JIT compile / cache load, thread pools, first-touch pages
    warm = time.perf_counter() - t0
    samples = []
    while len(samples) < max_repeats:
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        total = sum(samples)
        if len(samples) >= min_repeats and total >= target_s:
            break
        if total >= budget_s:
            break
    return samples, warm


def time_call(fn, *, min_repeats=3, max_repeats=20, target_s=1.0, budget_s=15.0):
    """Median seconds of ``fn()`` after one untimed warm-up call (:func:`time_samples`).
    Returns (median seconds, warm-up seconds, number of samples).
    """
    samples, warm = time_samples(fn, min_repeats=min_repeats, max_repeats=max_repeats,
                                 target_s=target_s, budget_s=budget_s)
    return statistics.median(samples), warm, len(samples)


# a row whose median is this much above its fastest sample (or whose slowest is SPREAD_MAX
# times it) was measured on a machine doing other work: its ratios are flagged
SPREAD_MEDIAN = 1.25
SPREAD_MAX = 2.0


def spread_note(name, samples_ms):
    """A warning naming the row when its samples spread widely, else None."""
    lo, med, hi = min(samples_ms), statistics.median(samples_ms), max(samples_ms)
    if med > SPREAD_MEDIAN * lo or hi > SPREAD_MAX * lo:
        return (f"WARNING {name}: samples spread widely (min {lo:.2f} / median {med:.2f} / "
                f"max {hi:.2f} ms): the machine was busy; its ratios are unreliable, rerun "
                f"on a quiet machine")
    return None


def busy_note(others, cpus):
    """A warning when other processes used more than a quarter of the CPUs' time while the
    bench ran (``others``: their CPU-seconds per wall second, from :class:`CpuShare`)."""
    if others is not None and cpus and others > 0.25 * cpus:
        return (f"WARNING machine busy: other processes used {others:.1f} of {cpus} CPUs "
                f"while the bench ran; timings are slower and noisier than on a quiet "
                f"machine, so rerun there before trusting a ratio")
    return None


class CpuShare:
    """CPU time the *other* processes of the machine use while this one runs: all CPUs'
    busy time (/proc/stat) minus this process's own (its threads included), per wall
    second. ``others()`` is None where /proc is missing (not Linux)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.s0 = self._snap()

    @staticmethod
    def _snap():
        import os

        try:
            with open("/proc/stat") as f:
                cpu = [int(x) for x in f.readline().split()[1:]]
            busy = sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0)  # minus idle, iowait
            t = os.times()
            return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def others(self):
        s1 = self._snap()
        wall = time.perf_counter() - self.t0
        if self.s0 is None or s1 is None or wall <= 0:
            return None
        return max((s1[0] - self.s0[0]) - (s1[1] - self.s0[1]), 0.0) / wall


def best_seconds(fn, repeats=7):
    """Fastest of ``repeats`` timed calls after a warm-up call (a peak, not a typical)."""
    fn()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fma_peak_gflops(seconds=0.3):
    """Register-only vector-FMA throughput of numba_attn's SIMD layer (GFLOP/s, float32,
    numba's threads, best of 3): the compute ceiling of the prefill micro-kernels."""
    import numba

    from .cpu import machine

    lanes = numba.get_num_threads()
    out = np.zeros(lanes, np.float32)
    machine.fma_peak(10, lanes, out)
    n_iter = 1_000_000
    t0 = time.perf_counter()
    machine.fma_peak(n_iter, lanes, out)
    n_iter = max(10_000, int(n_iter * seconds / max(time.perf_counter() - t0, 1e-6)))
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        fmas = machine.fma_peak(n_iter, lanes, out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * fmas / best / 1e9


def stream_read_seconds(k, v, repeats=7):
    """Best time to read every byte of K and V storage once with the decode kernel's vector
    loads (half types converted in registers) on numba's threads: the limit of a decode step
    over that cache."""
    from .cpu import machine
    from .cpu.simd import kernel_storage

    ks, vs = (np.ascontiguousarray(kernel_storage(x)).reshape(x.shape[0] * x.shape[1], -1)
              for x in (k, v))
    out = np.zeros(16, np.float32)
    return best_seconds(lambda: machine.stream_read(ks, vs, 16, out), repeats)


def sgemm_gflops(n=4096, repeats=3):
    """numpy float32 ``n^3`` matmul throughput (GFLOP/s, best of ``repeats``), all BLAS
    threads: the machine's sgemm peak."""
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    return 2.0 * n**3 / best_seconds(lambda: np.matmul(a, b, out=c), repeats) / 1e9


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


def run_bench(quick=False, name_filter=None, peers=("numpy", "torch"), out=None,
              err=None, json_path=None, plot_path=None):
    """Time every selected shape for numba_attn and each peer; print a table.

    Returns a dict: ``machine`` (CPU, SIMD target, threads, same-run limits) and ``rows``,
    one per shape (``ms``, ``gflops``, ``gbs``, ``limit_fraction``, ``peers`` ms, ``ratios``
    = peer ms / numba_attn ms: above 1 means numba_attn is faster), plus ``derived`` ratios
    (half caches against float32, decode after a matmul against alone, decode against the
    stream-read time). ``json_path`` writes it as JSON (``-``: stdout); ``plot_path`` draws
    the peer ratios (needs matplotlib).
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
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        skipped = [s.name for s in shapes if s.dtype == "bfloat16"]
        shapes = [s for s in shapes if s.dtype != "bfloat16"]
        if skipped:
            notes.append(f"{', '.join(skipped)}: skipped (bfloat16 needs ml_dtypes: "
                         "pip install ml_dtypes)")
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
        notes.append("decode rows: numba_attn.attention_with_kvcache over a filled KVCache "
                     "(no append); peers get the same K/V as plain arrays")
    threads = numba.get_num_threads()
    n_decode = sum(s.kind == "decode" for s in shapes)
    prog = Progress(2 + n_decode + len(shapes) * (1 + len(peer_list)), stream=err)
    prog.step("vector FMA peak (numba_attn's SIMD layer)")
    fma_peak = fma_peak_gflops(0.1 if quick else 0.3)
    prog.step("sgemm (numpy float32 matmul)")
    n = 2048 if quick else 4096
    sgemm = sgemm_gflops(n)
    rows = []
    share = CpuShare()
    for shape in shapes:
        q, k, v = make_inputs(shape)
        row = {"name": shape.name, "label": shape.label, "kind": shape.kind,
               "dtype": shape.dtype, "peers": {}, "ratios": {}}
        if shape.kind == "decode":
            prog.step(f"{shape.name}: stream-read of the same K/V bytes")
            row["stream_ms"] = stream_read_seconds(k, v) * 1e3
        prog.step(f"{shape.name}: numba_attn")
        samples, warm = time_samples(numba_attn_call(shape, q, k, v), **timing)
        ms = statistics.median(samples)
        ms_all = [x * 1e3 for x in samples]
        row.update(ms=ms * 1e3, min_ms=min(ms_all), max_ms=max(ms_all), first_call_s=warm,
                   repeats=len(samples), gflops=flops(shape) / ms / 1e9,
                   gbs=kv_bytes(shape) / ms / 1e9)
        if shape.kind == "decode":  # again after: a busy moment may have hit the first
            row["stream_ms"] = min(row["stream_ms"], stream_read_seconds(k, v) * 1e3)
        row["spread_warning"] = spread_note(shape.name, ms_all)
        if shape.kind == "decode" and row["min_ms"] < 0.9 * row["stream_ms"]:
            row["spread_warning"] = (
                f"WARNING {shape.name}: the stream-read of the same bytes ({row['stream_ms']:.2f}"
                f" ms) took longer than the fastest decode ({row['min_ms']:.2f} ms): the "
                f"machine was busy; the ratios to it are unreliable")
        if row["spread_warning"]:
            notes.append(row["spread_warning"])
        row["limit_fraction"] = (row["stream_ms"] / row["min_ms"] if shape.kind == "decode"
                                 else row["gflops"] / fma_peak)
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
                    why = peer_shape_reason(shape)
                    if why:
                        continue  # (noted once, for numpy)
                    fn = torch_peer(shape, q, k, v, threads)
            except NotImplementedError as e:
                notes.append(f"{shape.name}: {e}")
                continue
            pms, _, _ = time_call(fn, **timing)
            row["peers"][peer] = pms * 1e3
            row["ratios"][peer] = pms * 1e3 / row["ms"]
        rows.append(row)
    prog.close()
    import os

    others = share.others()
    busy = busy_note(others, os.cpu_count())
    if busy:
        notes.insert(0, busy)
    result = {"machine": dict(machine_info(threads, fma_peak, sgemm, n), other_cpus=others),
              "quick": quick, "rows": rows, "derived": derived_ratios(rows), "notes": notes}
    _print_table(result, peer_list, out)
    if json_path:
        _write_json(result, json_path, out)
    if plot_path:
        plot_ratios(result, plot_path)
    return result


def machine_info(threads, fma_peak, sgemm, n):
    import platform

    import numba

    from ._cli import _cpu_model
    from .cpu import simd

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region ran
        layer = f"{numba.config.THREADING_LAYER} requested"
    return {"cpu": _cpu_model(), "machine": platform.machine(), "simd": simd.ISA,
            "threads": threads, "threading_layer": layer,
            "fma_peak_gflops": fma_peak, "sgemm_gflops": sgemm, "sgemm_n": n}


def derived_ratios(rows):
    """Same-run ratios between rows: half caches vs float32, after a matmul vs alone,
    decode vs stream-read; on each row's fastest sample (the stream-read is a best-of too,
    and on a busy machine the fastest sample is the one least disturbed)."""
    by = {r["name"]: r for r in rows}
    out = {}
    for r in rows:
        if r["kind"] != "decode":
            continue
        fast = r.get("min_ms", r["ms"])
        if not r["name"].endswith("_after_matmul"):
            out[f"{r['name']}: fastest time / stream-read time"] = fast / r["stream_ms"]
        base = r["name"]
        for suffix in ("_float16", "_bfloat16", "_after_matmul"):
            base = base.replace(suffix, "")
        if base == r["name"] or base not in by:
            continue
        base_fast = by[base].get("min_ms", by[base]["ms"])
        if r["name"].endswith("_after_matmul"):
            out[f"{r['name']}: fastest time / alone"] = fast / base_fast
        else:
            out[f"{r['name']}: speed / float32 cache speed (fastest samples)"] = \
                base_fast / fast
    return out


def _write_json(result, path, out):
    import json

    text = json.dumps(result, indent=1, default=float)
    if path == "-":
        out.write(text + "\n")
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def plot_ratios(result, path):
    """Bar chart of peer ms / numba_attn ms per shape (the ``plot`` extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("bench --plot needs matplotlib: pip install 'numba_attn[plot]'") \
            from None
    rows = [r for r in result["rows"] if r["ratios"]]
    peers = sorted({p for r in rows for p in r["ratios"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.8 / max(len(peers), 1)
    for i, peer in enumerate(peers):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [r["ratios"].get(peer, 0) for r in rows], width, label=f"vs {peer}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(peers) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("peer time / numba_attn time")
    m = result["machine"]
    ax.set_title(f"numba_attn on {m['cpu']} ({m['simd']}, {m['threads']} threads)",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt_ratio(ratio):
    return f"{ratio:.2f}x" if ratio else "-"


def _print_table(result, peer_list, out):
    w = out.write
    m = result["machine"]
    w(f"\nbench ({'quick' if result['quick'] else 'full'}): {m['cpu']}, SIMD {m['simd']}, "
      f"numba threads = {m['threads']} (layer {m['threading_layer']}), median of repeats "
      "after a warm-up call\n")
    w(f"same-run limits: vector FMA peak {m['fma_peak_gflops']:.1f} GFLOP/s (numba_attn's "
      f"SIMD layer, registers only); numpy sgemm {m['sgemm_gflops']:.1f} GFLOP/s "
      f"({m['sgemm_n']}^3 float32); decode rows: stream-read of the same K/V bytes\n\n")
    head = ["shape", "problem", "ms", "min/max ms", "GFLOP/s", "of limit"]
    for p in peer_list:
        head += [f"{p} ms", f"vs {p}"]
    table = []
    for r in result["rows"]:
        if r["kind"] == "decode":
            frac = f"{r['limit_fraction']:.0%} stream"
        else:
            frac = f"{r['limit_fraction']:.0%} fma"
        spread = f"{r['min_ms']:.2f}/{r['max_ms']:.2f}" + ("!" if r["spread_warning"] else "")
        line = [r["name"], r["label"], f"{r['ms']:.2f}", spread, f"{r['gflops']:.1f}", frac]
        for p in peer_list:
            pm = r["peers"].get(p)
            line += [f"{pm:.2f}" if pm else "skip", _fmt_ratio(r["ratios"].get(p))]
        table.append(line)
    widths = [max(len(h), *(len(x[i]) for x in table)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{wd}}}" for i, wd in enumerate(widths))
    w(fmt.format(*head) + "\n")
    w("  ".join("-" * wd for wd in widths) + "\n")
    for line in table:
        w(fmt.format(*line) + "\n")
    w("\n'vs <peer>' = peer ms / numba_attn ms (above 1: numba_attn is faster). 'of limit': "
      "prefill GFLOP/s over the vector FMA peak; decode: stream-read time over the fastest "
      "decode time. "
      "'min/max ms': fastest and slowest sample ('!': widely spread, see the warnings).\n")
    for name, ratio in result["derived"].items():
        w(f"derived: {name} = {ratio:.2f}\n")
    over = [(r["first_call_s"] - r["ms"] / 1e3, r["name"]) for r in result["rows"]]
    extra, name = max(over)
    w(f"first-call overhead (JIT compile or cache load; first call minus median): "
      f"{max(extra, 0.0):.2f}s at most ({name})\n")
    for note in dict.fromkeys(result["notes"]):
        w(f"note: {note}\n")
    out.flush()
