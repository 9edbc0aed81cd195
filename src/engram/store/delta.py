"""The delta codec of compacted history: a blob coded against a *base* blob, or alone.

Pure functions over bytes; where coded blobs are stored and how their index entries
look is :mod:`engram.store.blobs` (layout in :mod:`engram.store.format`).

The transform of an encoded blob, for element size ``k`` (1, 2, 4 or 8 bytes):

1. ``d = target - base`` elementwise as unsigned ``k``-byte integers (wrapping), then
   zigzag ``z = (d << 1) ^ (d >> (8k - 1))`` on the signed view: an SGD step moves a
   float32 by a few units of its last place, so ``z`` is a small integer whose high
   bytes are zero (sign, exponent and upper mantissa are unchanged). A keyframe skips
   this step (``z = target``).
2. Byte shuffle: the ``k`` bytes of every element are grouped by significance (all
   first bytes, then all second bytes, ...), so the mostly-zero planes form long runs.
3. zstd at level 1.

Decoding inverts each step exactly (integer arithmetic modulo ``2**(8k)``), so every
bit pattern — NaN payloads, -0.0, denormals — comes back as it went in.
"""

from __future__ import annotations

import numpy as np
import zstandard

from engram.errors import CorruptionError

# Restoring a version decodes at most this many deltas per chunk: a longer chain is cut
# by a keyframe, so restoring any version costs O(MAX_CHAIN) decodes, never O(history).
MAX_CHAIN = 16
# An encoding is kept only if it saves at least 1/8 of the bytes: below that the
# decode work on every restore is not worth the disk.
MIN_SAVING = 1 / 8
ZSTD_LEVEL = 1  # on SGD deltas, level 1 is both smaller and ~2x faster than level 3

CODEC_ZSTD = 1  # the codec id an encoded blob's index entry names
ITEMSIZES = (1, 2, 4, 8)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def itemsize_for(element_size: int, nbytes: int) -> int:
    """The transform's element size for a chunk of elements of ``element_size`` bytes."""
    k = min(element_size, 8)  # complex128 is two float64s
    return k if k in _UINT and nbytes % k == 0 else 1


def encode(target: memoryview | bytes, base: memoryview | bytes | None, itemsize: int) -> bytes:
    """The zstd frame of ``target`` transformed against ``base`` (None: a keyframe)."""
    t = np.frombuffer(target, dtype=_UINT[itemsize])
    if base is not None:
        d = (t - np.frombuffer(base, dtype=_UINT[itemsize])).view(_INT[itemsize])
        t = ((d << 1) ^ (d >> (8 * itemsize - 1))).view(_UINT[itemsize])
    planes = t.view(np.uint8).reshape(-1, itemsize).T  # (itemsize, n): bytes by significance
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(np.ascontiguousarray(planes))


def decode(
    stored: memoryview | bytes,
    base: memoryview | bytes | None,
    itemsize: int,
    nbytes: int,
    what: str,
) -> memoryview:
    """Invert :func:`encode`; returns a byte view of a new buffer.

    Raises:
        CorruptionError: the frame does not decompress to ``nbytes`` bytes.
    """
    try:
        planes = zstandard.ZstdDecompressor().decompress(stored, max_output_size=nbytes)
    except zstandard.ZstdError as e:
        raise CorruptionError(f"{what}: encoded blob does not decompress ({e})") from None
    if len(planes) != nbytes or (base is not None and len(base) != nbytes):
        raise CorruptionError(f"{what}: encoded blob decodes to the wrong size")
    # Un-shuffle: element = plane[k-1] << 8(k-1) | ... | plane[0]; shifts of contiguous
    # planes run ~2.5x faster than a strided (itemsize, n) -> (n, itemsize) byte copy.
    plane = np.frombuffer(planes, np.uint8).reshape(itemsize, -1)
    z = plane[itemsize - 1].astype(_UINT[itemsize])
    for i in range(itemsize - 2, -1, -1):
        z <<= 8
        z |= plane[i]
    if base is not None:  # un-zigzag, then add the base (in place, wrapping)
        sign = z & 1
        np.negative(sign, out=sign)
        z >>= 1
        z ^= sign
        z += np.frombuffer(base, dtype=_UINT[itemsize])
    return z.view(np.uint8).data
