"""The collective steps of a data-parallel run: agree, commit, restore.

Each is entered by every rank at the same point of the run. Rank 0 does the store's
work and broadcasts the outcome (ok, or the error), so a refusal on rank 0 — a lineage
mismatch, a locked store, a failed commit — stops every rank at the same step, with
one message on rank 0 and :class:`PeerFailed` on the others.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from engram.distributed import DistributedError, PeerFailed, World, wire
from engram.distributed.state import (
    LocalSamples,
    map_sample_ids,
    records_tree,
    sample_ids_in,
    split_records,
)
from engram.store.codec import SampleIds


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
    do_commit: Callable[[list[dict[str, Any]]], Any],
) -> Any:
    """Gather every rank's ``part`` on rank 0, which appends the other ranks' new
    replay samples to the store and calls ``do_commit(parts of ranks 1..N-1)``;
    returns its result on rank 0 (None elsewhere) once every rank knows it committed.
    Rank 0's ``part`` is its own: a tensor of another rank's part equal to rank 0's at
    the same place (all-reduced importances) is not sent but taken from rank 0's, as
    the same object, so the store also hashes that memory once.
    """
    # Rank 0's tensor digests first: a rank sends only the tensors rank 0 does not hold
    # the same (the all-reduced importances and anchors cost 16 bytes each, not MBs).
    digests = wire.broadcast(_digests(part) if world.is_main else None, 0, world.group)
    if not world.is_main:
        staged, new = samples.stage(part)
        staged, same = _drop_known(staged, digests)
        wire.send({"part": staged, "new": new, "same": same}, 0, world.group)
        reply = wire.broadcast(None, 0, world.group)
        if not reply["ok"]:
            raise PeerFailed(f"rank {world.rank}: rank 0's commit failed: {reply['error']}")
        samples.committed(new["ids"], reply["ids"][world.rank - 1])
        return None
    own = part
    parts, assigned = [], []
    error: BaseException | None = None
    for r in range(1, world.size):
        got = wire.recv(r, world.group)  # every rank's part is received, even after an error
        if error is not None:
            continue
        try:
            ids, records = split_records(got["new"])
            real = store_samples.append(records) if records else []
            mapping = dict(zip(ids, real, strict=True))
            part = map_sample_ids(got["part"], lambda t, m=mapping: torch.tensor(
                [m.get(i, i) for i in t.tolist()], dtype=torch.int64))  # fmt: skip
            parts.append(_fill_known(part, got["same"], own))
            assigned.append(torch.tensor(real, dtype=torch.int64))
        except Exception as e:
            error = e
    result = None
    if error is None:
        try:
            result = do_commit(parts)
        except BaseException as e:
            error = e
    if error is not None:
        wire.broadcast({"ok": False, "error": f"{type(error).__name__}: {error}"}, 0, world.group)
        raise error
    wire.broadcast({"ok": True, "ids": assigned}, 0, world.group)
    return result


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
        stored = [_part(state), *state.get("ranks", [])]
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
    # an empty tensor from numpy has stride 0, which view() refuses: it has no bytes
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return f"{t.dtype}{tuple(t.shape)}{xxhash.xxh3_128_hexdigest(raw)}"


def _digests(part: Any) -> dict[str, str]:
    return {json.dumps(path): _digest(t) for path, t in _tensor_leaves(part)}


def _drop_known(part: Any, known: dict[str, str]) -> tuple[Any, list[str]]:
    """``part`` with each tensor whose digest rank 0 sent at the same path replaced by
    None, and those paths."""
    same = [key for path, t in _tensor_leaves(part)
            if known.get(key := json.dumps(path)) == _digest(t)]  # fmt: skip
    for key in same:
        _set(part, json.loads(key), None)
    return part, same


def _fill_known(part: Any, same: list[str], own: Any) -> Any:
    """Put rank 0's tensors back at the ``same`` paths (the objects, not copies)."""
    for key in same:
        path = json.loads(key)
        node = own
        for k in path:
            node = node[k]
        _set(part, path, node)
    return part


def _set(tree: Any, path: list, value: Any) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _part(state: dict[str, Any]) -> dict[str, Any]:
    """A rank's own part of a state: its RNG streams and plugin states."""
    return {"rng": state["rng"], "plugins": state["plugins"]}
