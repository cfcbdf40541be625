"""k-quant: llama.cpp's search for each block's scale and minimum (``make_qkx2_quants``), the
algorithm onnxruntime's ``k_quant`` runs, then one refinement step onnxruntime does not take.

For each block the search tries 20 stretched grids over [min, max]; for each it rounds the block
onto the grid and solves the weighted least-squares fit of (scale, min) to those codes, with
llama.cpp's weights |x| + rms(block); the best weighted fit wins. The weighted error of a fit is
computed from running sums (no second pass over the block). Because MatMulNBits stores an integer
zero point, the minimum is then snapped to the scale's grid, and (our addition) the scale is
re-fitted by least squares to the final codes and zero point (same codes, so the error can
only go down), which recovers part of what the snapping lost. Always asymmetric: the zero points are what k-quant is about.
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
        lo, hi = x.min(0), x.max(0)
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
            best_scale = np.where(flat | (best_scale <= 0), f32(1), best_scale).astype(f32)
            zp = np.clip(np.rint(-best_min / best_scale), 0, top)
            codes = np.clip(np.rint(x / best_scale + zp), 0, top)
            # Same codes, least-squares scale with the zero point fixed: the error can only drop.
            centred = codes - zp
            num, den = (centred * x).sum(0), (centred * centred).sum(0)
            refit = np.where(den > 0, num / den, best_scale).astype(f32)
            refit = np.where(refit > 0, refit, best_scale)
        return codes.astype(np.uint8), refit, zp.astype(np.uint8)
