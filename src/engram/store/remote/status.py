"""How far a store's remote is behind it, as ``engram ls STORE`` says it.

One read of the remote's HEAD (and, when HEAD names a version the store did not see
there last time, one read of its marker, for the version's ``created_at``), each within
:data:`STATUS_TIMEOUT_S` and without retries: ``ls`` never waits long and never fails
for the remote; a remote that cannot be read is reported as unreachable.
"""

from __future__ import annotations

from typing import Any

from engram.errors import EngramError, RemoteError
from engram.store import Store, version_name
from engram.store.remote.client import ObjectStore
from engram.store.remote.lineage import Entry, read_head, read_marker, remembered
from engram.store.remote.push import _since

STATUS_TIMEOUT_S = 2.0


def remote_status(store: Store, timeout_s: float | None = None) -> dict[str, Any] | None:
    """The remote the store remembers and where it stands, for ``ls --json``:
    ``{"url", "reachable", "head", "behind", "error"}`` (``behind``: versions of the
    store's HEAD lineage the remote lacks, None if its HEAD is not on that lineage);
    None if the store has no remote."""
    memory = remembered(store.path)
    if memory is None:
        return None
    result: dict[str, Any] = {"url": memory.url, "reachable": False, "head": None,
                              "behind": None, "error": None}  # fmt: skip
    try:
        client = ObjectStore(memory.url, timeout_s=timeout_s or STATUS_TIMEOUT_S)
        head, _ = read_head(client)
        result["reachable"] = True
        result["head"] = None if head is None else head.version
        entry = None
        if head is not None:
            entry = next((e for e in memory.lineage if e.ref == head), None)
            if entry is None:  # moved since this store last saw it: when was it made?
                marker = read_marker(client, head)
                entry = Entry(head, marker.created_at, marker.manifest_sha256)
        local = store.head
        chain = _since(store, None if local is None else local.id, entry)
        result["behind"] = None if chain is None else len(chain)
    except RemoteError as e:
        if not result["reachable"]:
            result["error"] = _reason(str(e), memory.url)
        else:
            result["error"] = " ".join(str(e).split())
    except EngramError as e:  # a damaged local manifest: `engram verify` says more
        result["error"] = " ".join(str(e).split())
    return result


def _reason(message: str, url: str) -> str:
    """The why of a client error, without the remote's name and the advice to retry."""
    text = message.removeprefix(f"remote {url}").lstrip(": ")
    return text.split("; local versions are intact", 1)[0]


def describe(status: dict[str, Any], store: str) -> str:
    """The line ``ls`` prints."""
    url = status["url"]
    if not status["reachable"]:
        return f"remote {url} unreachable ({status['error']})"
    behind, head = status["behind"], status["head"]
    if behind is None:
        if status["error"]:
            return f"remote {url}: {status['error']}"
        return (
            f"remote {url} HEAD {version_name(head)} is not in the history of this store's "
            f"HEAD (pushed from another clone?): `engram pull {url} NEW_DIR` to see it"
        )
    if behind == 0:
        at = "no versions" if head is None else f"HEAD {version_name(head)}"
        return f"remote {url} is up to date ({at})"
    plural = "s" if behind != 1 else ""
    return f"remote {url} is {behind} version{plural} behind; run `engram push {store}`"
