"""``Store.open(path, remote=URL)``: a store that knows its remote.

Before the store opens, the remote is caught up with as ``engram-train
store.remote=URL`` does (:func:`~engram.store.remote.background.catch_up`): a missing or
empty ``path`` is cloned from the remote's HEAD; opened for writing, a store the remote
is ahead of is fast-forwarded, and a store and remote that diverged are refused. A
store opened read-only is never written: it is only cloned if there is none. Opened for
writing, the store then remembers the URL (``<store>/remote.json``), so ``engram push
STORE`` and ``engram ls``'s "remote N versions behind" need no URL.
"""

from __future__ import annotations

from pathlib import Path

from engram.store import Store
from engram.store.remote.background import catch_up
from engram.store.remote.client import check_url
from engram.store.remote.lineage import remember, remembered
from engram.store.remote.pull import pull


def before_open(url: str, path: Path, mode: str) -> str:
    """Clone or fast-forward the store at ``path`` from ``url`` as ``mode`` allows; the
    checked URL.

    Raises:
        RemoteError: the URL is refused, or the remote cannot be read and ``path`` has
            no store to open instead.
        RemoteConflictError: the store and the remote diverged, or hold two stores.
    """
    url = check_url(url)
    if mode != "r":
        catch_up(url, path)
    elif not path.exists() or (path.is_dir() and not any(path.iterdir())):
        pull(url, path)
    return url


def after_open(store: Store, url: str) -> None:
    """Remember ``url`` as the store's remote (for a store opened for writing)."""
    memory = remembered(store.path)
    if memory is None or memory.url != url:
        remember(store.path, url, [])
