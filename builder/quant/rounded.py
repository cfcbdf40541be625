"""The rounded weights a build keeps between calibration and the graph writer: one file per
projection and layer (``RoundedWeights``), written by data-aware rounding (``quant.rounding``)
and served back by role when the graphs are written."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from builder.output import writing
from builder.quant.base import QuantizedWeight
from builder.quant.qdq import QdqWeight
from builder.roles import TensorRole as R

logger = logging.getLogger(__name__)

PACKED = {R.QKV: (R.Q, R.K, R.V), R.GATE_UP: (R.GATE, R.UP)}  # rows of one packed weight


def role_name(role) -> str:
    return role.value if isinstance(role, R) else role


class RoundedWeights:
    """The rounded projections of every layer, one file each in ``folder``: served to the graph
    writer by role and layer (packed q/k/v and gate/up put together by rows: MatMulNBits blocks
    run along each row, so a packed weight's blocks are its parts' blocks)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.served: list[str] = []   # weights served rounded, and those left to the quantizer
        self.missed: list[str] = []
        self.towards = [0, 0]  # (gptq_sequential) weights rounded towards the float layer's
        # outputs, of those whose inputs the rounding before them moved

    def path(self, role: R, layer: int) -> Path:
        return self.folder / f"{layer}.{role_name(role)}.npz"

    def save(self, role: R, layer: int, w: QuantizedWeight | QdqWeight) -> None:
        path = self.path(role, layer)
        with writing(path):
            if isinstance(w, QdqWeight):
                lpbq = {} if w.channel_scales is None else {"channel_scales": w.channel_scales}
                np.savez(path, codes=w.codes, scales=w.scales,
                         meta=np.array([w.bits, w.block_size or 0, w.conv]), **lpbq)
                return
            extra = {} if w.zero_points is None else {"zero_points": w.zero_points}
            np.savez(path, data=w.data, scales=w.scales,
                     meta=np.array([w.bits, w.block_size, w.k]), **extra)

    def log(self) -> None:
        logger.info("GPTQ: %d weights written as rounded with calibration data; by the "
                    "quantizer: %s", len(self.served), ", ".join(self.missed) or "none")
        self.log_towards()

    def log_towards(self) -> None:
        if self.towards[1]:
            logger.info("GPTQ: %d of the %d weights whose inputs the layer's rounding moved "
                        "rounded towards the float layer's outputs (closer to them on the "
                        "calibration prompts than rounded as they are)", *self.towards)

    def load(self, role: R, layer: int) -> QuantizedWeight | QdqWeight | None:
        path = self.path(role, layer)
        if not path.is_file():
            return None
        with np.load(path) as f:
            if "codes" in f:
                bits, block, conv = (int(v) for v in f["meta"])
                return QdqWeight.of(f["codes"], f["scales"], bits, block or None, bool(conv),
                                    f["channel_scales"] if "channel_scales" in f else None)
            bits, block, k = (int(v) for v in f["meta"])
            zp = f["zero_points"] if "zero_points" in f else None
            return QuantizedWeight(f["data"], f["scales"], zp, bits, block, k)

    def get(self, role: R, layer: int | None, bits: int) -> QuantizedWeight | None:
        """The rounded weight of ``role`` in ``layer`` at ``bits``, or None (not rounded, or
        rounded at other bits: the caller rounds to nearest)."""
        parts = [] if layer is None else [self.load(r, layer) for r in PACKED.get(role, (role,))]
        if not parts or any(p is None or p.bits != bits for p in parts):
            self.missed.append(role_name(role) + ("" if layer is None else f" (layer {layer})"))
            return None
        self.served.append(f"{layer}.{role_name(role)}")
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], QdqWeight):
            raise ValueError(f"packed {role.value}: the static graphs project q/k/v apart")
        zps = None if parts[0].zero_points is None else np.concatenate(
            [p.zero_points for p in parts])
        return QuantizedWeight(np.concatenate([p.data for p in parts]),
                               np.concatenate([p.scales for p in parts]), zps, parts[0].bits,
                               parts[0].block_size, parts[0].k)


def split_rows(w: QuantizedWeight | QdqWeight, sizes: list[int]) -> list:
    """A weight rounded as one, cut back into its parts (output rows)."""
    if len(sizes) == 1:
        return [w]
    cuts = np.cumsum(sizes)[:-1]
    if isinstance(w, QdqWeight):
        if w.conv:  # codes [N, K, 1, 1], scales [N]
            return [QdqWeight.of(c, s, w.bits, None, conv=True) for c, s in
                    zip(np.split(w.codes, cuts), np.split(w.scales, cuts))]
        axis = w.scales.ndim - 1  # codes [K, N]; scales [blocks, N] or [N]; LPBQ's [N]
        channels = [None] * len(sizes) if w.channel_scales is None else np.split(
            w.channel_scales, cuts)
        return [QdqWeight.of(np.ascontiguousarray(c), np.ascontiguousarray(s), w.bits,
                             w.block_size, channel_scales=p) for c, s, p in
                zip(np.split(w.codes, cuts, axis=1), np.split(w.scales, cuts, axis=axis),
                    channels)]
    zps = [None] * len(sizes) if w.zero_points is None else np.split(w.zero_points, cuts)
    return [QuantizedWeight(d, s, z, w.bits, w.block_size, w.k) for d, s, z in
            zip(np.split(w.data, cuts), np.split(w.scales, cuts), zps)]
