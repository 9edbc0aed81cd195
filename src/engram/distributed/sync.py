"""The collective steps of a data-parallel run: agree, commit, restore.

Each is entered by every rank at the same point of the run. Rank 0 does the store's
work and broadcasts the outcome (ok, or the error), so a refusal on rank 0 — a lineage
mismatch, a locked store, a failed commit — stops every rank at the same step, with
one message on rank 0 and :class:`PeerFailed` on the others.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from engram.distributed import DistributedError, PeerFailed, World, wire
from engram.distributed.state import (
    LocalSamples,
    records_tree,
    sample_ids_in,
    split_records,
)
from engram.errors import CorruptionError
from engram.store.codec import Encoded, SampleIds, raw_view

#: The key of a rank's commit message that rank 0 takes as encoded records.
_KEPT = ("part",)

#: The parts of a learner's state that differ by rank (each rank commits its own; the
#: rest is rank 0's, replicated): its RNG streams and its plugins' states.
RANKED = ("rng", "plugins")


def agree(
    world: World, step: str, fn: Callable[[], Any], share: Callable[[Any], Any] = lambda r: r
) -> Any:
    """``fn()`` on rank 0, ``share(fn())`` (packable) on the other ranks; an error on
    rank 0 is re-raised there and is :class:`PeerFailed` on the others."""
    if world.is_main:
        try:
            result = fn()
            reply = wire.pack({"ok": True, "result": share(result)})  # may fail too
        except BaseException as e:
            wire.broadcast({"ok": False, "error": f"{type(e).__name__}: {e}"}, 0, world.group)
            raise
        wire.broadcast(wire.unpack(reply), 0, world.group)
        return result
    reply = wire.broadcast(None, 0, world.group)
    if not reply["ok"]:
        raise PeerFailed(f"rank {world.rank}: rank 0 failed to {step}: {reply['error']}")
    return reply["result"]


def same_config(world: World, digest: str) -> None:
    """Every rank was given the same configuration (``digest`` of its resolved config).

    Raises:
        DistributedError: on every rank, naming the ranks that differ from rank 0.
    """
    digests = wire.all_gather_bytes(digest.encode(), world.group)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DistributedError(
            f"ranks {', '.join(map(str, differ))} were given a configuration that differs "
            "from rank 0's; give every rank the same overrides"
        )


def commit(
    world: World,
    part: dict[str, Any],
    samples: LocalSamples | None,
    store_samples: Any,
    do_commit: Callable[[Callable[[], list[Encoded]]], Any],
) -> Any:
    """Gather every rank's ``part`` on rank 0 and commit one version there; returns
    ``do_commit``'s result on rank 0 (None elsewhere) once every rank knows it committed.

    ``do_commit(gather)`` commits on rank 0; ``gather()`` returns the parts of ranks
    1..N-1, once their new replay samples are appended to ``store_samples``, each as the
    records it arrived as (:class:`~engram.store.codec.Encoded`: validated as a
    manifest is, never decoded into tensors; the store splices it in). Rank 0
    posts the parts' receives on entry (:class:`~engram.distributed.wire.Incoming`), so
    they arrive while it stages its own state; given to ``Store.commit`` as a
    :class:`~engram.store.Later` value, ``gather()`` then runs beside the write and
    fsync of the weights and finds them there, instead of waiting a gloo round trip.

    A rank sends its part as soon as it reaches the commit, each tensor replaced by its
    digest (XXH3-128 of dtype, shape and bytes) unless rank 0 held another tensor at
    that place at an earlier commit (``samples.whole``). Rank 0 puts its own tensor
    there when the digests match — the all-reduced importances and anchors, MBs each,
    the same object, so the store hashes that memory once — and asks the rank for the
    others in a second round (the rank's RNG streams, at its first commit). From then
    on a commit is one message each way: the part, then the outcome.
    """
    if not world.is_main:
        staged, new = samples.stage(part)
        staged, digests = _digest_tensors(staged, samples.whole)
        wire.send({"part": staged, "new": new, "digests": digests}, 0, world.group)
        while True:
            reply = wire.broadcast(None, 0, world.group)
            if not reply["ok"]:
                raise PeerFailed(f"rank {world.rank}: rank 0's commit failed: {reply['error']}")
            if "need" not in reply:
                break
            asked = reply["need"][world.rank - 1]
            if asked:
                wire.send({key: _get(part, _key_path(key)) for key in asked}, 0, world.group)
                samples.whole.update(asked)
        samples.committed(new["ids"], reply["ids"][world.rank - 1])
        return None
    gather = _Gather(world, part, store_samples)
    try:
        result = do_commit(gather)
        if not gather.done:
            raise DistributedError("the commit did not gather the other ranks' parts")
    except BaseException as error:
        if not gather.done:  # every rank's part is received (its send would hang)
            with contextlib.suppress(Exception):
                gather.drain()
        wire.broadcast({"ok": False, "error": f"{type(error).__name__}: {error}"}, 0, world.group)
        raise
    # The version is durable: rank 0 goes on while the outcome travels.
    wire.broadcast({"ok": True, "ids": gather.assigned}, 0, world.group, wait=False)
    return result


class _Gather:
    """Rank 0's receive of the other ranks' parts, called once by the commit."""

    def __init__(self, world: World, own: dict[str, Any], store_samples: Any) -> None:
        self._world, self._own, self._store_samples = world, own, store_samples
        self.done = False
        self.assigned: list[torch.Tensor] = []  # each rank's new samples' store ids
        # Posted now, so the parts travel while rank 0 encodes its own state and the
        # weights are written (wire.Incoming): the gather then finds them arrived.
        self._parts = [wire.Incoming(r, world.group) for r in range(1, world.size)]

    def drain(self) -> None:
        """Receive every part and keep none (the commit failed before it gathered)."""
        self.done = True
        _receive_all([functools.partial(i.result, _KEPT) for i in self._parts])

    def __call__(self) -> list[Encoded]:
        if self.done:
            raise DistributedError("the other ranks' parts were already received")
        self.done = True
        group, ranks = self._world.group, list(range(1, self._world.size))
        # each part as the records it arrives as: the store splices them in, with no
        # decode into tensors and encode again
        got = _receive_all([functools.partial(i.result, _KEPT) for i in self._parts])
        for g in got:
            if not isinstance(g, dict) or not isinstance(g.get("part"), Encoded):
                raise CorruptionError("a rank's part is not a packed mapping with its part")
        own: dict[str, torch.Tensor | None] = {}  # rank 0's tensor at each path asked of
        mine: dict[str, str] = {}  # and its digest, each computed once

        def held(key: str, path: tuple, digest: str) -> bool:
            if key not in own:
                leaf = _get(self._own, path, missing=None)
                own[key] = leaf if _is_tensor(leaf) else None
            if own[key] is None:
                return False
            if key not in mine:
                mine[key] = _digest(own[key])
            return mine[key] == digest

        paths = [{k: _key_path(k) for k in g["digests"]} for g in got]
        need = [[k for k, d in g["digests"].items() if not held(k, p[k], d)]
                for g, p in zip(got, paths, strict=True)]  # fmt: skip
        if any(need):  # a second round: the tensors rank 0 does not hold the same
            wire.broadcast({"ok": True, "need": need}, 0, group)
            asked = [r for r, paths in zip(ranks, need, strict=True) if paths]
            tensors = _receive_all([functools.partial(wire.recv, r, group) for r in asked])
            sent = dict(zip(asked, tensors, strict=True))
            sent = [sent.get(r, {}) for r in ranks]
        else:
            sent = [{} for _ in ranks]
        parts = []
        for g, p, asked, tensors in zip(got, paths, need, sent, strict=True):
            part = g["part"]
            for key, path in p.items():  # CorruptionError: not a place the rank left out
                part.put(path, tensors[key] if key in asked else own[key])
            ids, records = split_records(g["new"])
            real = self._store_samples.append(records) if records else []
            if real:  # the part's provisional ids of its new samples become the store's
                mapping = dict(zip(ids, real, strict=True))
                for array in part.samples:
                    values = array.raw.view(np.int64).tolist()
                    array.raw = np.array([mapping.get(i, i) for i in values], np.int64).view(
                        np.uint8
                    )
            parts.append(part)
            self.assigned.append(torch.tensor(real, dtype=torch.int64))
        return parts


def _receive_all(receives: list[Callable[[], Any]]) -> list[Any]:
    """Each of ``receives`` (one message from a rank): all of them, even after an error
    (a rank is not left waiting on its send), then the first error is raised."""
    got, error = [], None
    for receive in receives:
        try:
            got.append(receive())
        except Exception as e:
            got.append(None)
            error = error or e
    if error is not None:
        raise error
    return got


def restore(
    world: World,
    load: Callable[[], tuple[dict[str, Any], dict[str, torch.Tensor]] | None],
    read_records: Callable[[list[int]], list[bytes]] | None,
    samples: LocalSamples | None,
    repartition: Callable[[list[dict[str, Any]], int], list[dict[str, Any]]],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Every rank's ``(state, weights)`` of HEAD (None: an empty store).

    On rank 0 ``load()`` gives HEAD's state (with ``"ranks"``, the other ranks'
    parts) and weights; ``repartition(parts, size)`` maps the stored ranks' parts to
    this world's (the identity when the world size is the one stored). Each other rank
    gets the replicated state with its own part, and the replay samples it references.
    """

    def prepare() -> tuple[Any, list[Any]] | None:
        """Rank 0: HEAD, and what each other rank gets (all of it before anything is
        sent, so a failure here reaches every rank through agree)."""
        loaded = load()
        if loaded is None:
            return None
        state, weights = loaded
        stored = [part(state), *state.get("ranks", [])]
        parts = repartition(stored, world.size) if len(stored) != world.size else stored
        common = {k: v for k, v in state.items() if k != "ranks"}
        payloads = []
        for r in range(1, world.size):
            ids = [i for i in sample_ids_in(parts[r]) if i >= 0]
            records = read_records(ids) if ids else []
            payloads.append({"state": {**common, **parts[r]}, "model": weights,
                             "samples": records_tree(ids, records)})  # fmt: skip
        return ({**common, **parts[0]}, weights), payloads

    prepared = agree(world, "read the store's HEAD", prepare, share=lambda x: x is not None)
    if not prepared:
        return None
    if world.is_main:
        mine, payloads = prepared
        for r, payload in enumerate(payloads, start=1):
            wire.send(payload, r, world.group)
        dist.barrier(group=world.group)
        return mine
    got = wire.recv(0, world.group)
    ids, records = split_records(got["samples"])
    samples.load(ids, records)
    dist.barrier(group=world.group)
    return got["state"], got["model"]


def _tensor_leaves(tree: Any, path: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    """``(path, tensor)`` of every tensor in ``tree`` except sample ids."""
    if isinstance(tree, torch.Tensor):
        return [] if isinstance(tree, SampleIds) else [(path, tree)]
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _tensor_leaves(v, (*path, k))]
    if isinstance(tree, list):  # (a tensor inside a tuple is always sent: immutable)
        return [x for i, v in enumerate(tree) for x in _tensor_leaves(v, (*path, i))]
    return []


def _digest(t: torch.Tensor) -> str:
    # not tensor_bytes: its checks cost ~2 us a tensor, and a commit digests ~100
    if t.requires_grad or not t.is_cpu or not t.is_contiguous():
        t = t.detach().cpu().contiguous()
    try:
        raw = t.numpy()  # its memory, as raw_view's bytes, one call cheaper
    except TypeError:  # bfloat16, float8: no numpy dtype
        raw = raw_view(t)
    return _described(t.dtype, t.shape) + xxhash.xxh3_128_hexdigest(raw)


@functools.lru_cache(maxsize=1 << 12)
def _described(dtype: torch.dtype, shape: torch.Size) -> str:
    """A digest's dtype and shape: formatting them cost more than hashing a small tensor."""
    return f"{dtype}{tuple(shape)}"


def _digest_tensors(part: Any, whole: set[str]) -> tuple[Any, dict[str, str]]:
    """``part`` with each tensor not at a path in ``whole`` replaced by None, and those
    tensors' digests by path (``part`` is the rank's staged copy: its containers are its
    own)."""
    digests = {}
    for path, t in _tensor_leaves(part):
        key = _path_key(path)
        if key not in whole:
            digests[key] = _digest(t)
            _set(part, list(path), None)
    return part, digests


@functools.lru_cache(maxsize=1 << 14)
def _path_key(path: tuple) -> str:
    """A path as the message's key (JSON); a part's paths are the same at every commit."""
    return json.dumps(path)


@functools.lru_cache(maxsize=1 << 14)
def _key_path(key: str) -> tuple:
    """:func:`_path_key` inverted (a tuple: the cached value is shared)."""
    try:
        path = json.loads(key)
    except ValueError:
        path = None
    if not isinstance(path, list):
        raise CorruptionError(f"a part's tensor path is not a JSON list: {key[:80]!r}")
    return tuple(path)


_RAISE = object()


def _get(tree: Any, path: Sequence[Any], missing: Any = _RAISE) -> Any:
    """The value at ``path`` (dict keys and list indices); ``missing`` where there is
    none (by default a path must lead somewhere: KeyError, IndexError, TypeError)."""
    for k in path:
        if missing is not _RAISE and not (
            (isinstance(tree, dict) and _hashable(k) and k in tree)
            or (isinstance(tree, list) and type(k) is int and 0 <= k < len(tree))
        ):
            return missing
        tree = tree[k]
    return tree


def _hashable(k: Any) -> bool:
    return k is None or isinstance(k, bool | int | float | str)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, SampleIds)


def _set(tree: Any, path: Sequence[Any], value: Any) -> None:
    _get(tree, path[:-1])[path[-1]] = value


def part(state: dict[str, Any]) -> dict[str, Any]:
    """A rank's own part of a state: its RNG streams and plugin states (:data:`RANKED`)."""
    return {name: state[name] for name in RANKED}
