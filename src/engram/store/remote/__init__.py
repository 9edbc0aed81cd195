"""A store's remote in object storage: ``push`` a store's versions, ``pull`` them back.

A remote is an object-store prefix (``s3://bucket/prefix``; gs://, az://) holding a
store's versions as immutable objects and a HEAD moved by compare-and-swap
(:mod:`~engram.store.remote.layout`; docs/remote.md). It is never an LMDB environment:
a pulled store is a normal local store.

Rooms: :mod:`~engram.store.remote.client` (the object-store library, behind five verbs;
file:// with its compare-and-swap), :mod:`~engram.store.remote.layout` (keys, markers,
segments, tags), :mod:`~engram.store.remote.lineage` (the remote's history; what a store
remembers of it), :mod:`~engram.store.remote.push`, :mod:`~engram.store.remote.pull`,
:mod:`~engram.store.remote.background` (beside a training run: ``catch_up`` before it, a
``BackgroundPusher`` after each experience), :mod:`~engram.store.remote.attach`
(``Store.open(path, remote=)``), :mod:`~engram.store.remote.cache` (a remote read in
place through a local copy), :mod:`~engram.store.remote.verify` (``engram verify
REMOTE``), :mod:`~engram.store.remote.status` (``engram ls``'s "remote N versions behind"),
:mod:`~engram.store.remote.gc` (``engram gc REMOTE``: what no ref reaches, never a push's),
:mod:`~engram.store.remote.tags` (``engram tag REMOTE NAME``: a remote tag moved or deleted).
"""

from engram.store.remote.background import BackgroundPusher, catch_up
from engram.store.remote.pull import PullReport, pull
from engram.store.remote.push import PushReport, push, unpushed

__all__ = ["BackgroundPusher", "PullReport", "PushReport", "catch_up", "pull", "push", "unpushed"]
