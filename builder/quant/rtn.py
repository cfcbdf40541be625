"""Round to nearest, bit for bit as onnxruntime's own blockwise quantizer (MLAS, reached from
Python through ``quantize_matmul_4bits`` / ``quantize_matmul_8bits``).

Symmetric: the block's value of largest magnitude maps to code 0, scale = that value / -2^(b-1),
zero point 2^(b-1). Asymmetric: the range [min(x, 0), max(x, 0)] spans all codes, zero point
rounded. Codes are roundf(x * (1 / scale) + zero point), clamped, in float32.
"""

from __future__ import annotations

import numpy as np

from builder.quant.base import Quantizer, round_half_away


class RtnQuantizer(Quantizer):
    name = "rtn"

    def quantize_blocks(self, x: np.ndarray):
        f32 = np.float32
        top = f32((1 << self.bits) - 1)
        mid = f32(1 << (self.bits - 1))
        lo, hi = x.min(0), x.max(0)
        if self.symmetric:
            extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo)
            scales = (extreme / -mid).astype(f32)
            zp = np.full(scales.shape, mid, f32)
        else:
            lo, hi = np.minimum(lo, f32(0)), np.maximum(hi, f32(0))
            scales = ((hi - lo) / top).astype(f32)
            with np.errstate(divide="ignore", invalid="ignore"):
                zp_f = np.where(scales != 0, f32(0) - lo / scales, lo).astype(f32)
            zp = np.clip(round_half_away(zp_f), 0, top)
        with np.errstate(divide="ignore"):
            recip = np.where(scales != 0, f32(1) / scales, f32(0)).astype(f32)
        scaled = x * recip
        scaled += zp
        codes = np.clip(round_half_away(scaled), 0, top, out=scaled).astype(np.uint8)
        return codes, scales, zp.astype(np.uint8)
