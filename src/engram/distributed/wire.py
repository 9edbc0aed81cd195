"""State trees over ``torch.distributed`` as bytes, never as pickles.

``gather_object``/``broadcast_object_list`` pickle, so a rank could make another run
code; these functions send a tree (dicts, lists, tuples, JSON scalars, tensors, numpy
arrays, :class:`~engram.store.SampleIds`) as the store's own encoding: a JSON header
(:func:`engram.store.codec.encode_tree`, validated on arrival as a manifest is) and the
arrays' raw bytes, in one uint8 tensor. Gloo moves CPU tensors; callers pass the gloo
group of :func:`engram.distributed.world`.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engram.errors import CorruptionError
from engram.store.codec import (
    ArrayRecord,
    array_from_bytes,
    decode_tree,
    encode_tree,
    encoded_tree,
)
from engram.store.format import CHUNK_BYTES

_ZERO_DIGEST = "0" * 64  # a wire record's chunks carry sizes only (TCP checks the bytes)


def pack(tree: Any) -> torch.Tensor:
    """``tree`` as one uint8 tensor: 8-byte header length, JSON header, array bytes."""
    encoded, pending = encode_tree(tree)
    for array in pending:
        n = len(array.raw)
        array.record["chunks"] = [
            [_ZERO_DIGEST, min(CHUNK_BYTES, n - at), 0] for at in range(0, n, CHUNK_BYTES)
        ]
    header = json.dumps(encoded, allow_nan=True).encode()
    parts = [np.frombuffer(struct.pack("<Q", len(header)) + header, np.uint8)]
    parts += [array.raw for array in pending]
    return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0].copy())


def unpack(data: torch.Tensor, keep: tuple[str, ...] = ()) -> Any:
    """Invert :func:`pack` (arrays are copies, independent of ``data``).

    ``keep``: keys of a top-level mapping whose values come back as
    :class:`~engram.store.codec.Encoded` subtrees, validated but not decoded (their
    arrays views of ``data``), for a commit to splice in as they are.

    Raises:
        CorruptionError: the bytes are not a packed tree.
    """
    raw = data.numpy()
    if len(raw) < 8:
        raise CorruptionError("a packed state is shorter than its header")
    (n,) = struct.unpack("<Q", raw[:8].tobytes())
    try:
        tree = json.loads(raw[8 : 8 + n].tobytes())
    except (ValueError, RecursionError) as e:
        raise CorruptionError(f"a packed state's header is not JSON: {e}") from None
    at = 8 + n

    def view(record: ArrayRecord, where: str) -> np.ndarray:
        nonlocal at
        if at + record.nbytes > len(raw):
            raise CorruptionError(f"a packed state ends inside the array at {where!r}")
        at += record.nbytes
        return raw[at - record.nbytes : at]

    def read(record: ArrayRecord, where: str) -> Any:
        piece = bytearray(view(record, where))
        chunk = (
            torch.frombuffer(piece, dtype=torch.uint8)
            if piece
            else torch.zeros(0, dtype=torch.uint8)
        )
        return array_from_bytes(record, chunk)  # SampleIds come back as SampleIds

    if keep and isinstance(tree, dict) and not any(k.startswith("__") for k in tree):
        # the arrays follow the header in the tree's order: each value in turn
        out = {k: encoded_tree(v, view) if k in keep else decode_tree(v, read)
               for k, v in tree.items()}  # fmt: skip
    else:
        out = decode_tree(tree, read)
    if at != len(raw):
        raise CorruptionError(f"a packed state has {len(raw) - at} bytes after its arrays")
    return out


#: Every transfer starts with one message of this many bytes: the payload's length (8
#: bytes) and its first bytes; a longer payload follows in a second message. The small
#: trees a commit exchanges (digests, a rank's RNG streams and slot table, the reply)
#: so take one message, not a size and then a payload: each is a gloo round trip, and
#: those round trips were most of what the collective commit added to a small one.
FRAME = 64 << 10


def _frame(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first message for ``data`` and the rest (None: it fits the first)."""
    n = data.numel()
    first = torch.empty(FRAME, dtype=torch.uint8)
    first[:8] = torch.frombuffer(bytearray(struct.pack("<Q", n)), dtype=torch.uint8)
    k = min(n, FRAME - 8)
    first[8 : 8 + k] = data[:k]
    return first, (data[k:] if n > k else None)


def _unframe(first: torch.Tensor, receive: Any) -> torch.Tensor:
    """The payload whose first message is ``first``; ``receive(tensor)`` fills the rest."""
    (n,) = struct.unpack("<Q", first[:8].numpy().tobytes())
    k = min(n, FRAME - 8)
    if n == k:
        return first[8 : 8 + n]
    rest = torch.empty(n - k, dtype=torch.uint8)
    receive(rest)
    return torch.cat([first[8 : 8 + k], rest])


#: Broadcasts rank 0 sent without waiting (a commit's outcome): their work handles and
#: tensors, kept alive until :func:`settle`.
_in_flight: list[tuple[Any, torch.Tensor]] = []


def settle() -> None:
    """Wait for the broadcasts sent with ``wait=False``; raises a failed one's error."""
    while _in_flight:
        work, _ = _in_flight.pop(0)
        work.wait()


def send(tree: Any, dst: int, group: Any = None) -> None:
    settle()
    first, rest = _frame(pack(tree))
    dist.send(first, dst, group=group)
    if rest is not None:
        dist.send(rest.contiguous(), dst, group=group)


def recv(src: int, group: Any = None) -> Any:
    return Incoming(src, group).result()


class Incoming:
    """A receive from ``src`` posted now, read by :meth:`result` later.

    A gloo transfer is a rendezvous: the sender's bytes move only once the receive is
    posted, and a receiver that posts and then waits sleeps through that round trip
    (2-4 ms on a loaded 2-core VM, where each wake-up waits for a core). Posted early,
    the first message arrives in gloo's own threads while this one works; :meth:`result`
    then finds it there. Process-group receives from one source keep their order, so
    receives posted after this one get the later messages.
    """

    def __init__(self, src: int, group: Any = None) -> None:
        settle()
        self._src, self._group = src, group
        self._first = torch.empty(FRAME, dtype=torch.uint8)
        self._work = dist.irecv(self._first, src, group=group)

    def result(self, keep: tuple[str, ...] = ()) -> Any:
        """The tree sent (waits for it; a longer payload's rest is received now);
        ``keep``: as :func:`unpack`'s."""
        self._work.wait()
        src, group = self._src, self._group
        data = _unframe(self._first, lambda rest: dist.recv(rest, src, group=group))
        return unpack(data, keep)


def broadcast(tree: Any, src: int = 0, group: Any = None, *, wait: bool = True) -> Any:
    """``src``'s ``tree`` on every rank (other ranks pass anything, e.g. None).

    ``wait=False`` (on ``src``): return once the broadcast is under way; the next
    transfer of this module, or :func:`settle`, waits for it. Process-group operations
    keep their order, so what ``src`` sends next arrives after it.
    """
    settle()
    if dist.get_rank() == src:
        first, rest = _frame(pack(tree))
        for message in [first] if rest is None else [first, rest.contiguous()]:
            if wait:
                dist.broadcast(message, src, group=group)
            else:
                _in_flight.append((dist.broadcast(message, src, group=group, async_op=True),
                                   message))  # fmt: skip
        return tree
    first = torch.empty(FRAME, dtype=torch.uint8)
    dist.broadcast(first, src, group=group)
    return unpack(_unframe(first, lambda rest: dist.broadcast(rest, src, group=group)))


def gather(tree: Any, group: Any = None) -> list[Any] | None:
    """Every rank's ``tree`` on rank 0, in rank order (None on the other ranks)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        send(tree, 0, group)
        return None
    return [tree] + [recv(r, group) for r in range(1, size)]


def all_gather_bytes(data: bytes, group: Any = None) -> list[bytes]:
    """Every rank's ``data`` (short: digests, flags) on every rank."""
    size = dist.get_world_size()
    mine = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(sizes, mine, group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else 0
    out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(size)]
    dist.all_gather(out, padded, group=group)
    return [bytes(o[: int(s)].tolist()) for o, s in zip(out, sizes, strict=True)]
