"""k-quant: llama.cpp's search for each block's scale and minimum (``make_qkx2_quants``), the
algorithm onnxruntime's ``k_quant`` runs, then one refinement step onnxruntime does not take.

For each block the search tries 20 stretched grids over [min, max]; for each it rounds the block
onto the grid and solves the weighted least-squares fit of (scale, min) to those codes, with
llama.cpp's weights |x| + rms(block); the best weighted fit wins. The weighted error of a fit is
computed from running sums (no second pass over the block). Because MatMulNBits stores an integer
zero point, the grid always spans 0, and the fitted minimum is snapped to the scale's grid; then
(our additions) the scale is re-fitted by least squares to the final codes and zero point, and
the plain min/max grid replaces the search's fit where that is better (blocks of one sign).
Always asymmetric: the zero points are what k-quant is about.
"""

from __future__ import annotations

import numpy as np

from builder.quant.base import Quantizer

STEPS, DELTA, START = 20, 0.1, -1.0


class KQuantQuantizer(Quantizer):
    name = "k_quant"

    def quantize_blocks(self, x: np.ndarray):
        f32 = np.float32
        top = f32((1 << self.bits) - 1)
        w = np.sqrt((x * x).mean(0)) + np.abs(x)          # llama.cpp's importance weights
        sum_w, sum_x, sum_x2 = w.sum(0), (w * x).sum(0), (w * x * x).sum(0)
        # The stored zero point is an integer code, so the grid always contains 0.
        lo, hi = np.minimum(x.min(0), f32(0)), np.maximum(x.max(0), f32(0))
        span = hi - lo
        flat = span == 0
        span = np.where(flat, f32(1), span)
        shifted = x - lo

        def fit(factor):
            q = shifted * (factor / span)
            np.rint(q, out=q)
            np.clip(q, 0, top, out=q)
            wq = w * q
            return wq.sum(0), (wq * q).sum(0), (wq * x).sum(0)

        def mad(scale, mn, s_l, s_l2, s_xl):  # sum w (scale q + mn - x)^2, expanded
            return (scale * scale * s_l2 + 2 * scale * mn * s_l + mn * mn * sum_w
                    - 2 * scale * s_xl - 2 * mn * sum_x + sum_x2)

        best_scale = (span / top).astype(f32)
        best_min = lo
        best = mad(best_scale, best_min, *fit(top))
        with np.errstate(divide="ignore", invalid="ignore"):
            for step in range(STEPS):
                s_l, s_l2, s_xl = fit(f32(START + DELTA * step) + top)
                det = sum_w * s_l2 - s_l * s_l
                scale = (sum_w * s_xl - sum_x * s_l) / det
                mn = (s_l2 * sum_x - s_l * s_xl) / det
                err = mad(scale, mn, s_l, s_l2, s_xl)
                better = (err < best) & np.isfinite(err) & (scale > 0)
                best = np.where(better, err, best)
                best_scale = np.where(better, scale, best_scale)
                best_min = np.where(better, mn, best_min)
            # MatMulNBits stores an integer zero point: snap each fit to the grid, refit the scale
            # to the final codes, and keep the better of the search's fit and the plain
            # min/max grid (a block of one sign can fit a minimum the zero point cannot hold).
            codes, refit, zp, err = snap(x, w, best_scale, best_min, flat, top)
            codes0, refit0, zp0, err0 = snap(x, w, (span / top).astype(f32), lo, flat, top)
            plain = err0 < err
            codes = np.where(plain, codes0, codes)
            refit = np.where(plain, refit0, refit)
            zp = np.where(plain, zp0, zp)
        return codes.astype(np.uint8), refit, zp.astype(np.uint8)


def snap(x, w, scale, mn, flat, top):
    """(codes, least-squares scale for those codes, zero point, weighted error) for a fit."""
    f32 = np.float32
    scale = np.where(flat | ~(scale > 0), f32(1), scale).astype(f32)
    zp = np.clip(np.rint(-mn / scale), 0, top)
    codes = np.clip(np.rint(x / scale + zp), 0, top)
    centred = codes - zp
    num, den = (centred * x).sum(0), (centred * centred).sum(0)
    refit = np.where(den > 0, num / den, scale).astype(f32)
    refit = np.where(refit > 0, refit, scale)
    err = (w * (centred * refit - x) ** 2).sum(0)
    return codes, refit, zp, err
