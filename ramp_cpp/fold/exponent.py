"""The searched folding exponent (issue 37, AWQ-style): per fold group, the power of s = max|x|^power that
llama.cpp's own quantizer rounds best, judged without a forward pass.

For one group (a norm and the linears it feeds), each power p of the grid gives scales s_p
(folding.fold_scales) and, for every quantizable tensor W (n_out, n_in) of the group and every search type t
(as llama.cpp writes it on rows of n_in: ladder.written_type), with m = E[x²] of the *unfolded* input
(`mean_sq`, n_in):

    W_f  = W · diag(s)                       the folded weight (rounded to F16 when the file stores F16)
    q    = dequant(quant_t(W_f, imatrix = m / s²))     llama.cpp's row quantizer, the folded model's imatrix
    err  = Σ_j m[j] · Σ_i (W[i, j] − q[i, j] / s[j])²
         = Σ_j (m[j] / s[j]²) · Σ_i (W_f[i, j] − q[i, j])²

the error of the effective weight q · diag(1/s) seen from the unfolded input, weighted by that input's E[x²]
(the second line: the same sum in the folded model's coordinates, weighted by its imatrix). The group's error
is the sum over its tensors and types; the power with the smallest error is kept. p = 0 gives s ≡ 1 + eps, the
group as good as unfolded (a uniform rescale by 1.00001). A candidate whose folded weights overflow F16 in an
F16 file is not eligible.

An expert tensor's rows (n_expert · n_out, n_in) are weighed by the experts' pooled E[x²]; 1-D gate vectors
and tensors llama.cpp never quantizes (the router) take no part: their rounding does not change with s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from gguf import GGMLQuantizationType

from ramp_cpp.llama.native import quantize_rows
from ramp_cpp.model.ladder import written_type

F16_MAX = float(np.finfo(np.float16).max)
CHUNK_ELEMENTS = 1 << 22  # rows quantized and compared per call: bounded memory on wide tensors


def folded_error(
    w: np.ndarray,
    s: np.ndarray,
    mean_sq: np.ndarray,
    qtype: GGMLQuantizationType,
    f16: bool = False,
    n_threads: int = 1,
) -> float:
    """err = Σ_j mean_sq[j] · Σ_i (w[i, j] − q[i, j] / s[j])² with q = dequant(quant_qtype(w · diag(s),
    imatrix = mean_sq / s²)), llama.cpp's quantizer writing `qtype` as it would on rows of w's width (its
    fallback type where the rows do not fit qtype's blocks). `w`: (n_rows, n_in) float rows; `f16`: the
    folded rows are rounded to F16 first, as an F16 file stores them. Infinite when that overflows F16."""
    from gguf.quants import dequantize

    w = np.asarray(w, dtype=np.float32)
    n_rows, n_in = w.shape
    s32 = np.asarray(s, dtype=np.float32)
    m = np.asarray(mean_sq, dtype=np.float64)
    qt = written_type(qtype, n_in)
    imatrix = (m / np.asarray(s, dtype=np.float64) ** 2).astype(np.float32)
    step = max(1, CHUNK_ELEMENTS // n_in)
    per_col = np.zeros(n_in, dtype=np.float64)  # Σ_i (W_f − q)² per column
    for a in range(0, n_rows, step):
        wf = w[a : a + step] * s32
        if f16:
            if float(np.abs(wf).max()) > F16_MAX:
                return float("inf")
            wf = wf.astype(np.float16).astype(np.float32)
        raw = np.frombuffer(quantize_rows(int(qt), wf, imatrix, n_threads), dtype=np.uint8)
        q = np.asarray(dequantize(raw.reshape(len(wf), -1), qt), dtype=np.float32).reshape(wf.shape)
        q -= wf
        per_col += np.square(q, dtype=np.float64).sum(axis=0)
    return float(per_col @ imatrix.astype(np.float64))


def choose_power(
    tensors: Sequence[np.ndarray],
    mean_sq: np.ndarray,
    scales: Callable[[float], np.ndarray],
    grid: Sequence[float],
    qtypes: Sequence[GGMLQuantizationType],
    f16: bool = False,
    n_threads: int = 1,
) -> tuple[float, tuple[tuple[float, float], ...]]:
    """(the power of `grid` with the smallest group error, (power, error) for every power in grid order):
    the error of a power p is Σ over `tensors` (each (n_rows, n_in) float rows) and `qtypes` of
    folded_error(W, scales(p), mean_sq, t). Ties keep the earlier power of the grid."""
    errors = []
    for p in grid:
        s = scales(p)
        errors.append((float(p), sum(
            folded_error(w, s, mean_sq, t, f16, n_threads) for w in tensors for t in qtypes
        )))
    best = min(range(len(errors)), key=lambda i: errors[i][1])
    return errors[best][0], tuple(errors)
