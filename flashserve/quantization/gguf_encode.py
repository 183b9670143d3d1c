"""A float weight matrix → the bytes of GGUF blocks of one type, optionally guided by an importance
matrix (the mean squared input activation of each column, imatrix.py).

    Q4_K, Q5_K   super-blocks of 256: 8 sub-blocks of 32 with an affine fit each (block_fit.fit_affine,
                 4 or 5-bit codes), their scales and offsets as 6-bit integers times fp16 d and dmin
    Q6_K         super-blocks of 256: 16 sub-blocks of 16 with a symmetric fit (6-bit codes), their
                 scales as int8 times one fp16 d
    Q4_0, Q5_0   with an importance matrix: the symmetric fit per block of 32; without: gguf-py's
    Q4_1, Q5_1   (llama.cpp's) round-to-nearest; the _1 types with the affine fit
    Q8_0         gguf-py's round-to-nearest (llama.cpp gives Q8_0 no importance either)

Fit weights (llama.cpp's choice for its K-quants with an importance matrix): w_i = a_i * sqrt(sigma^2
+ x_i^2), x the weights of the block, sigma^2 twice their mean square over the super-block (K-quants)
or the row (legacy), a_i the importance of column i: large weights and important columns are fitted
more closely. Without an importance matrix the K-quants take the same fit with a_i = 1 (llama.cpp's
reference path weighs by |x_i| plus the block's root mean square instead, with a shorter search), so
the two files differ by the importance matrix alone.

A row whose length is not a multiple of 256 cannot hold K-quant super-blocks; such a tensor falls
back as llama.cpp's quantizer does (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0): see `fitted_type`.
"""
from __future__ import annotations

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from flashserve.errors import FlashserveError
from flashserve.quantization.block_fit import fit_affine, fit_positive, fit_symmetric

QK = 256  # weights per K-quant super-block
K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
TYPES = {q.name: q for q in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)}
_CHUNK = 1 << 21  # weights encoded at once (bounds the fits' temporaries to tens of MiB)


def fitted_type(qtype: Q, ncols: int, name: str) -> Q:
    """The type a tensor with rows of `ncols` weights gets when `qtype` is asked for."""
    if qtype in K_FALLBACK and ncols % QK:
        qtype = K_FALLBACK[qtype]
    block = GGML_QUANT_SIZES[qtype][0]
    if ncols % block:
        raise FlashserveError(f"{name}: rows of {ncols} weights do not split into {qtype.name} blocks of {block}")
    return qtype


def encode(w: np.ndarray, qtype: Q, importance: np.ndarray | None = None) -> np.ndarray:
    """w (rows, cols) float → (rows, bytes per row) uint8 blocks of `qtype`; importance (cols,) >= 0."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if importance is not None and importance.shape != (w.shape[1],):
        raise FlashserveError(f"importance has {importance.shape} entries for rows of {w.shape[1]} weights")
    if qtype == Q.Q8_0 or (importance is None and qtype not in _K_ENCODERS):
        return quants.quantize(w, qtype)
    step = max(1, _CHUNK // w.shape[1])
    encoder = _K_ENCODERS.get(qtype) or _LEGACY[qtype]
    return np.concatenate([encoder(w[r : r + step], importance) for r in range(0, w.shape[0], step)])


def _fit_weights(x: np.ndarray, importance: np.ndarray | None, group: int) -> np.ndarray:
    """(rows, cols) → (rows, cols) fit weights, sigma^2 taken over groups of `group` columns."""
    rows, cols = x.shape
    sq = (x * x).reshape(rows, cols // group, group)
    sigma2 = 2 * sq.mean(2, keepdims=True)
    w = np.sqrt(sigma2 + sq).reshape(rows, cols)
    return w if importance is None else w * importance[None, :]


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def _affine_super_blocks(x: np.ndarray, importance, nmax: int):
    """Q4_K / Q5_K codes: (d fp16 (nb,), dmin fp16 (nb,), 6-bit scales (nb, 8), mins (nb, 8), L (nb, 256))."""
    nb = x.size // QK
    wts = _fit_weights(x, importance, QK).reshape(nb * 8, 32)
    sub = x.reshape(nb * 8, 32)
    scale, offset, _ = fit_affine(sub, wts, nmax)
    sw = wts.sum(1).reshape(nb, 8)
    d, ls = fit_positive(scale.reshape(nb, 8), sw, 63)
    dmin, lm = fit_positive(offset.reshape(nb, 8), sw, 63)
    d, dmin = _f16(d), _f16(dmin)
    step = (d.astype(np.float32)[:, None] * ls).reshape(nb * 8, 1)  # the rounded scales, as decoded
    low = (dmin.astype(np.float32)[:, None] * lm).reshape(nb * 8, 1)
    codes = np.clip(np.rint((sub + low) / np.where(step > 0, step, 1)), 0, nmax)
    codes = np.where(step > 0, codes, 0).astype(np.uint8).reshape(nb, QK)
    return d, dmin, ls.astype(np.uint8), lm.astype(np.uint8), codes


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins → the 12 bytes of a Q4_K/Q5_K block: bytes 0-3 scales 0-3,
    4-7 mins 0-3 (each with 2 high bits of scale/min 4-7 on top), 8-11 low nibbles of scale|min 4-7."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return out


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """(nb, 256) codes → (nb, 128): per 64 weights, byte l holds weight l (low) and weight l + 32 (high)."""
    c = codes.reshape(-1, 4, 2, 32) & 15
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)


def _head(*halves: np.ndarray) -> np.ndarray:
    return np.concatenate([h.reshape(-1, 1).view(np.uint8) for h in halves], axis=1)


def _q4_k(x, importance):
    d, dmin, ls, lm, codes = _affine_super_blocks(x, importance, 15)
    blocks = np.concatenate([_head(d, dmin), _pack_k_scales(ls, lm), _nibbles(codes)], axis=1)
    return blocks.reshape(x.shape[0], -1)


def _q5_k(x, importance):
    d, dmin, ls, lm, codes = _affine_super_blocks(x, importance, 31)
    high = (codes >> 4).reshape(-1, 4, 2, 32)  # bit 2c of byte l: weight 64c + l; bit 2c+1: weight 64c + 32 + l
    qh = sum(high[:, c, h].astype(np.uint8) << (2 * c + h) for c in range(4) for h in range(2))
    blocks = np.concatenate([_head(d, dmin), _pack_k_scales(ls, lm), qh.astype(np.uint8), _nibbles(codes)], axis=1)
    return blocks.reshape(x.shape[0], -1)


def _q6_k(x, importance):
    nb = x.size // QK
    wts = _fit_weights(x, importance, QK).reshape(nb * 16, 16)
    sub = x.reshape(nb * 16, 16)
    scale, _ = fit_symmetric(sub, wts, 32)
    scale = scale.reshape(nb, 16)
    peak = scale[np.arange(nb), np.abs(scale).argmax(1)]  # signed largest sub-block scale
    zero = np.abs(peak) < 1e-15
    iscale = np.where(zero, 0, -128 / np.where(zero, 1, peak))
    sc = np.clip(np.rint(iscale[:, None] * scale), -128, 127).astype(np.int8)
    d = _f16(np.where(zero, 0, 1 / np.where(zero, 1, iscale)))
    step = (d.astype(np.float32)[:, None] * sc).reshape(nb * 16, 1)
    codes = np.clip(np.rint(sub / np.where(step != 0, step, 1)), -32, 31) + 32
    codes = np.where(step != 0, codes, 32).astype(np.uint8).reshape(nb, 2, 4, 32)  # (half, quarter, l)
    ql = np.concatenate([(codes[:, :, 0] & 15) | ((codes[:, :, 2] & 15) << 4),
                         (codes[:, :, 1] & 15) | ((codes[:, :, 3] & 15) << 4)], axis=2).reshape(nb, 128)
    qh = sum((codes[:, :, q] >> 4) << (2 * q) for q in range(4)).reshape(nb, 64).astype(np.uint8)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), _head(d)], axis=1)
    return blocks.reshape(x.shape[0], -1)


def _legacy(qtype: Q, bits: int, affine: bool):
    """Q4_0/Q5_0 (symmetric, codes stored + 2^(bits-1)) and Q4_1/Q5_1 (affine) with importance weights."""
    half = 1 << (bits - 1)

    def encode_blocks(x, importance):
        nb = x.size // 32
        wts = _fit_weights(x, importance, x.shape[1]).reshape(nb, 32)
        sub = x.reshape(nb, 32)
        if affine:
            scale, offset, codes = fit_affine(sub, wts, 2 * half - 1)
            head = _head(_f16(scale), _f16(-offset))
        else:
            scale, codes = fit_symmetric(sub, wts, half)
            codes = codes + half
            head = _head(_f16(scale))
        codes = codes.astype(np.uint8)
        qs = (codes[:, :16] & 15) | ((codes[:, 16:] & 15) << 4)
        parts = [head, qs]
        if bits == 5:  # bit j of the little-endian uint32 qh: bit 4 of weight j
            qh = ((codes >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(1, dtype=np.uint32)
            parts.insert(1, qh.astype("<u4").reshape(-1, 1).view(np.uint8))
        return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)

    return encode_blocks


_K_ENCODERS = {Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
_LEGACY = {Q.Q4_0: _legacy(Q.Q4_0, 4, False), Q.Q5_0: _legacy(Q.Q5_0, 5, False),
           Q.Q4_1: _legacy(Q.Q4_1, 4, True), Q.Q5_1: _legacy(Q.Q5_1, 5, True)}
