"""GPTQ: round a weight's columns one at a time, each rounding error spread over the columns not
yet rounded so as to keep the layer's outputs on its calibration inputs (Frantar et al., "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2022).

Math on one weight, no graphs. ``H = 2 X^T X`` over the calibration tokens X [T, K] that reach
the projection (``hessian``); the weight [N, K] as Hugging Face stores it; the output the same
codes, scales and zero points as round to nearest (``rtn``) in the same layout, only chosen
differently: for MatMulNBits (``QuantizedWeight``, onnxruntime's grid: symmetric scale =
extreme / -2^(b-1), codes around 2^(b-1)) or for QDQ blocks (symmetric, scale = absmax / 7.5 at
4 bits, codes -8..7, as ``quant.qdq``). Each block of ``block_size`` input columns takes its
scale from its columns as they stand when the first of them is rounded (the errors of the
earlier blocks already spread into them), as GPTQ's grouped variant does.

Columns are processed in lazy batches of ``BATCH`` columns whose updates reach the later columns
in one matrix product: in the weight's order, or (``ordered``, GPTQ's "act order") from the input
of the largest Hessian diagonal (the largest mean square input) down, so that the columns that
cost most when rounded are rounded first, while the most columns are left to absorb their error.
The blocks stay contiguous in the weight's order (MatMulNBits and QDQ blocks are), so ordered
rounding takes every block's scale from the weight as given, before any column is rounded
(the "static groups" of GPTQ's implementation): nothing in the stored layout changes, no
permutation reaches the graph.
"""

from __future__ import annotations

import numpy as np

from builder.quant.base import QuantizedWeight, pack, round_half_away
from builder.quant.qdq import SIGNED, QdqWeight, lpbq_block_scales, lpbq_channel_scales

BATCH = 128        # columns per lazy update
STEP = 8           # and within a block: a column's error reaches the next columns of its step
                   # at once, the step's errors the rest of the block in one product
DAMP = 0.01        # of the Hessian's mean diagonal, added to its diagonal: at least this, and
DAMP_PER_INPUT = 0.1  # this times inputs / tokens where the calibration tokens are few
# against a weight's inputs (``damping``)


class Grid:
    """A block's scale (and zero point) from its values, and the codes of a column."""

    def __init__(self, bits: int, symmetric: bool, qdq: bool,
                 channel: np.ndarray | None = None) -> None:
        self.bits, self.symmetric, self.qdq = bits, symmetric, qdq
        self.channel = channel  # LPBQ: the per-channel scale [N] block scales are multiples of
        if qdq and not symmetric:
            raise ValueError("QDQ weights are symmetric")

    def params(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero point) per row of ``block`` [N, columns], float32."""
        f32, b = np.float32, self.bits
        if self.channel is not None:  # quant.qdq's LPBQ multiplier, on the block as it stands
            return lpbq_block_scales(block.T[None], self.channel, b)[0], np.zeros(len(block), f32)
        if self.qdq:  # quant.qdq: scale = 2 absmax / (qmax - qmin), zero point 0
            qmin, qmax, _ = SIGNED[b]
            absmax = np.abs(block).max(axis=1)
            scale = (2 * absmax / f32(qmax - qmin)).astype(f32)
            return np.where(scale > 0, scale, f32(1)), np.zeros(len(block), f32)
        mid, top = f32(1 << (b - 1)), f32((1 << b) - 1)
        lo, hi = block.min(axis=1), block.max(axis=1)
        if self.symmetric:  # quant.rtn: the extreme value maps to code 0
            extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo)
            return (extreme / -mid).astype(f32), np.full(len(block), mid, f32)
        lo, hi = np.minimum(lo, f32(0)), np.maximum(hi, f32(0))
        scale = ((hi - lo) / top).astype(f32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale != 0, f32(0) - lo / scale, lo).astype(f32)
        return scale, np.clip(round_half_away(zp), 0, top)

    def codes(self, column: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """A column's codes (float32; QDQ: signed, else unsigned around the zero point)."""
        f32 = np.float32
        if self.qdq:
            qmin, qmax, _ = SIGNED[self.bits]
            return np.clip(np.rint(column / scale), qmin, qmax)
        with np.errstate(divide="ignore"):
            recip = np.where(scale != 0, f32(1) / scale, f32(0)).astype(f32)
        return np.clip(round_half_away(column * recip + zero), 0, (1 << self.bits) - 1)

    def value(self, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        return (codes - zero) * scale


def damping(tokens: int, inputs: int) -> float:
    """The damping (of the Hessian's mean diagonal) for a Hessian of ``inputs`` inputs from
    ``tokens`` calibration tokens: GPTQ's 1% where tokens are many times the inputs, up to 1 as
    they become fewer. A Hessian of fewer tokens than inputs has directions it never saw, and
    GPTQ spreads errors into them as if they were free: measured on a synthetic 1024-input
    layer (inputs with a decaying spectrum and a few large channels, the error on other inputs
    of the same distribution, ``tests/test_gptq.py``), GPTQ at 1% with 600 tokens leaves 1.45x
    round to nearest's output error, with this damping 0.86x (with 2400 tokens: 0.76x and
    0.68x). On inputs of a steep spectrum, where GPTQ gains most (0.07-0.13x rtn's), it costs
    up to a tenth of that gain; on white inputs, where GPTQ cannot gain, it halves GPTQ's
    loss. With a real tokenizer the 24 prompts calibration takes by default are 535 tokens
    (GPT-2's BPE; all 93 shipped, 2,286), against a 0.6B model's 1024 and 3072 inputs, an 8B's
    4096 and 12288."""
    return min(1.0, max(DAMP, DAMP_PER_INPUT * inputs / max(1, tokens)))


def inverse_factor(hessian: np.ndarray, damp: float = DAMP, ordered: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(the upper Cholesky factor of the damped H^-1, float32; the dead inputs; the order) of a
    Hessian: row i of the factor holds what column i's error does to the later columns, already
    conditioned on the earlier ones. Weights that share an input share this. ``ordered``: the
    factor is that of H with its inputs in act order (``order``, the input indices by
    descending Hessian diagonal; the dead ones last), else ``order`` is None.

    Without inverting H whole: with J the reversal of the columns, J H J = L L^T (Cholesky), so
    H = U U^T with U = J L J upper triangular, and H^-1 = (U^-1)^T U^-1: the factor is U^-1 =
    J L^-1 J. A third of inv() then cholesky(). One float32 copy of H is worked on in place
    (factor, inverse, reversal), with quarter-size temporaries: at an 8B model's 12288 inputs
    the copy is 0.6 GB, where copies in float64 and out-of-place halves took 3.4 GB."""
    dead = np.diag(hessian) == 0  # inputs that calibration never saw non-zero: nothing to keep
    order = None
    if ordered:
        order = np.argsort(-np.diag(hessian), kind="stable")
        h = np.empty(hessian.shape, np.float32)  # (the one copy, a slice of rows at a time)
        for i in range(0, len(h), 1024):
            h[i:i + 1024] = hessian[order[i:i + 1024]][:, order]
        dead_here = dead[order]
    else:
        h = np.array(hessian, np.float32)  # float32, as GPTQ's own: the damping bounds the
        dead_here = dead  # condition number
    n = len(h)
    diagonal = np.diag_indices(n)
    h[dead_here, dead_here] = 1.0
    h[diagonal] += np.float32(damp * np.mean(np.diag(h), dtype=np.float64))
    h *= np.float32(1 / np.mean(np.diag(h), dtype=np.float64))  # (a scale GPTQ does not
    reverse(h)  # see: it uses the factor's ratios)
    cholesky(h)
    invert_lower(h)
    reverse(h)
    return h, dead, order


def times_inverse(a: np.ndarray, hessian: np.ndarray, factor: tuple,
                  damp: float = DAMP) -> np.ndarray:
    """``a`` [N, K] times the damped H^-1, from ``inverse_factor``'s ``factor`` of ``hessian``:
    its F is that of H scaled to a mean diagonal of 1 (its dead inputs' diagonal 1, then
    damped), so H^-1 = F^T F / that mean (in act order: P^T F^T F P, P the order's
    permutation)."""
    f, _, order = factor
    diagonal = np.diag(hessian).astype(np.float64)
    mean = np.mean(np.where(diagonal == 0, 1.0, diagonal)) * (1 + damp)
    if order is None:
        return (a @ f.T) @ f * np.float32(1 / mean)
    out = np.empty_like(a, dtype=np.result_type(a, f))
    out[:, order] = (a[:, order] @ f.T) @ f * np.float32(1 / mean)
    return out


def rows_times_inverse(y: np.ndarray, x: np.ndarray, scale: float, hessian: np.ndarray,
                       damp: float = DAMP) -> np.ndarray:
    """``scale Y^T X`` [N, K] times the damped H^-1, from the token rows X [T, K] and Y [T, N]
    themselves where the tokens are fewer than the inputs: H = scale X^T X (``hessian``, the
    same sums) damped as ``inverse_factor`` damps it, H' = scale X^T X + D (D diagonal: the
    damping, and 1 for a dead input), and X H'^-1 = (scale X D^-1 X^T + I)^-1 X D^-1, a T x T
    system instead of K x K: T^2 K + T^2 N + N T K multiply-adds against ``times_inverse``'s
    2 N K^2 (at an 8B model's down_proj, 2,600 calibration tokens: a fifth of the work; 8 s
    against 23 s measured beside a build on 2 cores)."""
    diagonal = np.diag(hessian).astype(np.float64)
    dead = diagonal == 0
    inverse_d = (1 / (damp * np.mean(np.where(dead, 1.0, diagonal)) + dead)).astype(
        np.float32)  # (D as inverse_factor damps)
    system = np.empty((len(x), len(x)), np.float64)
    for i in range(0, len(x), 1024):  # (X D^-1 X^T, a slice of X D^-1 at a time)
        system[i:i + 1024] = np.dot(x[i:i + 1024] * inverse_d, x.T)
    system *= scale
    system[np.diag_indices(len(system))] += 1
    z = np.dot(np.linalg.inv(system).astype(np.float32).T, y)  # (symmetric: T x N)
    del system
    out = np.dot(np.ascontiguousarray(z.T), x)
    out *= np.float32(scale) * inverse_d
    return out


def reverse(a: np.ndarray, chunk: int = 1 << 20) -> None:
    """J A J in place (both axes reversed) for a C-contiguous square ``a``: its flat order
    reversed, a chunk from each end swapped at a time."""
    flat = a.reshape(-1)
    i, j = 0, flat.size
    while j - i > 1:
        c = min(chunk, (j - i) // 2)
        head = flat[i:i + c].copy()
        flat[i:i + c] = flat[j - c:j][::-1]
        flat[j - c:j] = head[::-1]
        i, j = i + c, j - c


def cholesky(a: np.ndarray) -> np.ndarray:
    """A symmetric positive definite ``a`` overwritten by its lower Cholesky factor (above the
    diagonal zeroed), by halves: L11 = chol(A11), L21 = A21 L11^-T, L22 = chol(A22 - L21
    L21^T): matrix products, where numpy's own factorization runs at a tenth of the machine's
    matmul speed at these sizes (0.36 s for 3072 x 3072 on 2 cores)."""
    n = len(a)
    if n <= 512:
        a[...] = np.linalg.cholesky(a)
        return a
    m = n // 2
    cholesky(a[:m, :m])
    a[m:, :m] = a[m:, :m] @ triangular_inverse(np.ascontiguousarray(a[:m, :m].T))  # L11^-T
    a[m:, m:] -= a[m:, :m] @ a[m:, :m].T
    cholesky(a[m:, m:])
    a[:m, m:] = 0
    return a


def invert_lower(a: np.ndarray) -> np.ndarray:
    """A lower triangular ``a`` overwritten by its inverse, by halves: [[A, 0], [C, D]]^-1 =
    [[A^-1, 0], [-D^-1 C A^-1, D^-1]]."""
    n = len(a)
    if n <= 64:
        a[...] = np.linalg.inv(a)
        return a
    m = n // 2
    invert_lower(a[:m, :m])
    invert_lower(a[m:, m:])
    a[m:, :m] = -(a[m:, m:] @ (a[m:, :m] @ a[:m, :m]))
    return a


def triangular_inverse(u: np.ndarray) -> np.ndarray:
    """The inverse of an upper triangular matrix, by halves: [[A, B], [0, D]]^-1 =
    [[A^-1, -A^-1 B D^-1], [0, D^-1]] (matrix products all the way down)."""
    n = len(u)
    if n <= 64:
        return np.linalg.inv(u)
    m = n // 2
    a, d = triangular_inverse(u[:m, :m]), triangular_inverse(u[m:, m:])
    out = np.zeros_like(u)
    out[:m, :m], out[m:, m:] = a, d
    out[:m, m:] = -a @ u[:m, m:] @ d
    return out


def gptq(weight: np.ndarray, hessian: np.ndarray, grid: Grid, block_size: int,
         factor: tuple | None = None, damp: float = DAMP, ordered: bool = False
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [N, K] float32, scales [N, blocks], zero points [N, blocks]) of ``weight`` [N, K]
    rounded by GPTQ with ``hessian`` [K, K] (``K`` a multiple of ``block_size``; ``factor``:
    ``inverse_factor(hessian, damp, ordered)`` when already computed, whose order then rules;
    ``ordered``: in act order, each block's scale from the weight as given). float32 updates,
    as GPTQ's own.

    Held transposed ([K, N]: a column of the weight is a contiguous row), and lazy on three
    levels: a column's error reaches the rest of its STEP columns at once, a step's errors the
    rest of its block in one product, the block's the rest of the batch when the block is
    done, the batch's the later columns (every column is updated before it is rounded, as in
    the column-at-a-time form)."""
    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"GPTQ: {k} input features are not whole blocks of {block_size}")
    inverse, dead, order = (factor if factor is not None
                            else inverse_factor(hessian, damp, ordered))
    w = np.asarray(weight, np.float32)
    codes = np.empty((k, n), np.float32)  # (row i: input column i's codes, in either order)
    scales = np.empty((k // block_size, n), np.float32)
    zeros = np.empty((k // block_size, n), np.float32)
    group = None
    if order is None:
        wt = np.array(w.T, order="C")  # (one copy, transposed)
        wt[dead] = 0.0
    else:  # static blocks: every scale from the weight as given, then the columns in act
        for g in range(k // block_size):  # order, each with its block's scale
            columns = slice(g * block_size, (g + 1) * block_size)
            block = w[:, columns]  # (a view; a copy only where an input is dead)
            if dead[columns].any():
                block = np.where(dead[columns], np.float32(0), block)
            scales[g], zeros[g] = grid.params(block)
        group = order // block_size
        wt = np.ascontiguousarray(w.T[order])  # (one copy, transposed and permuted)
        wt[dead[order]] = 0.0
    # a batch is whole blocks, or a block whole batches (per-channel: one block of K)
    batch = BATCH if BATCH % block_size == 0 or block_size % BATCH == 0 else block_size
    segment = min(batch, block_size)
    for a in range(0, k, batch):
        b = min(a + batch, k)
        errors = np.empty((b - a, n), np.float32)
        for start in range(a, b, segment):
            end = min(start + segment, b)
            if group is None and start % block_size == 0:  # the block as the earlier errors
                g = start // block_size  # left it (a block of several batches starts a
                s, z = grid.params(wt[start:start + block_size].T)  # batch: none pending)
                scales[g], zeros[g] = s, z
            for sub in range(start, end, STEP):
                last = min(sub + STEP, end)
                for col in range(sub, last):
                    if group is not None:
                        s, z = scales[group[col]], zeros[group[col]]
                    q = grid.codes(wt[col], s, z)
                    codes[col if group is None else order[col]] = q
                    err = (wt[col] - grid.value(q, s, z)) / inverse[col, col]
                    if col + 1 < last:
                        wt[col + 1:last] -= np.outer(inverse[col, col + 1:last], err)
                    errors[col - a] = err
                if last < end:
                    wt[last:end] -= inverse[sub:last, last:end].T @ errors[sub - a:last - a]
            if end < b:
                wt[end:b] -= inverse[start:end, end:b].T @ errors[start - a:end - a]
        if b < k:
            wt[b:] -= inverse[a:b, b:].T @ errors
    return (np.ascontiguousarray(codes.T), np.ascontiguousarray(scales.T),
            np.ascontiguousarray(zeros.T))


def gptq_matmul_nbits(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int,
                      symmetric: bool, factor=None, damp: float = DAMP,
                      ordered: bool = False) -> QuantizedWeight:
    """A [N, K] weight rounded by GPTQ, in MatMulNBits' layout (K padded to whole blocks: the
    padding's inputs are zero, their Hessian rows dead)."""
    n, k = weight.shape
    padded = -(-k // block_size) * block_size
    if padded != k:
        weight = np.concatenate([weight, np.zeros((n, padded - k), weight.dtype)], axis=1)
        h = np.zeros((padded, padded), np.float32)
        h[:k, :k] = hessian
        hessian, factor = h, None  # (the factor again, of the padded Hessian, in ``ordered``)
    codes, scales, zeros = gptq(weight, hessian, Grid(bits, symmetric, qdq=False), block_size,
                                factor, damp, ordered)
    codes[:, k:] = 0  # the kernels' padding
    data = pack(codes.astype(np.uint8).reshape(n, -1, block_size), bits)
    zero_points = None if symmetric else pack(zeros.astype(np.uint8), bits)
    return QuantizedWeight(data, scales, zero_points, bits, block_size, k)


def gptq_qdq(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int | None,
             conv: bool, factor=None, lpbq: bool = False, damp: float = DAMP,
             ordered: bool = False) -> QdqWeight:
    """A [N, K] weight rounded by GPTQ as the static graphs' QDQ weight: symmetric, block-wise
    along K on MatMul (``block_size``; ``lpbq``: as LPBQ, the per-channel scale from the
    weight as given, each block's multiplier when GPTQ reaches it, or in act order from the
    weight as given too), per output channel otherwise (``None``)."""
    n, k = weight.shape
    block = block_size or k
    channel = None
    if lpbq and block_size and not conv:
        channel = lpbq_channel_scales(np.asarray(weight, np.float32).T.reshape(
            k // block, block, n), bits)
    codes, scales, _ = gptq(weight, hessian, Grid(bits, True, qdq=True, channel=channel), block,
                            factor, damp, ordered)
    codes = codes.astype(np.int8)
    if conv:
        return QdqWeight.of(codes.reshape(n, k, 1, 1), scales[:, 0], bits, None, conv=True)
    if not block_size:
        return QdqWeight.of(np.ascontiguousarray(codes.T), scales[:, 0], bits, None)
    return QdqWeight.of(np.ascontiguousarray(codes.T), np.ascontiguousarray(scales.T), bits,
                        block_size, channel_scales=channel)


def hessian_of(x: np.ndarray) -> np.ndarray:
    """2 X^T X of tokens X [T, K], float64."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return 2 * x.T @ x
