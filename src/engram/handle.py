"""A stored model loaded on demand that follows its ref: for agents and long-running programs.

    import engram

    handle = engram.ModelHandle("runs/ewc", "prod")   # a path or an open Store; a ref
    model = handle.model                               # loaded on first use, then cached
    model, version = handle.get()                      # the model and the version it is
    handle.refresh()                                   # check now; True if it reloaded
    print(handle.card)                                 # what it is (engram.card)

    handle = engram.ModelHandle("s3://bucket/runs/ewc@prod")  # a remote: follows its prod

At most every ``check_every`` seconds a call re-resolves the ref (one LMDB read
transaction, a few microseconds); when it names another version, that version is loaded
by its id and swapped in whole, so a tag moved mid-load cannot mix two versions, and
only published versions are ever seen. On a remote (``s3://BUCKET/PREFIX[@REF]``,
``file:///ABS/PATH[@REF]``), a check is one read of the remote's HEAD or tag (no more
often than ``check_every``); when it moved, the handle's local copy is brought up to date
(:mod:`engram.store.remote.cache`) and the new version's files fetched before it is
swapped in. A remote that cannot be reached is served from the copy (one warning per
outage; a handle made while it is down starts from the copy's version) and tried again
at each check; a remote that answers but cannot be used is a failed check. Every handle
and ``load_model`` on one remote in a process share one open copy. A version that fails
to load (deleted by ``gc``, corrupted, or — with ``trust`` — not signed by the trusted
key) or a ref that no longer resolves leaves the cached model serving, with one warning;
the next check tries again.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engram.errors import EngramError, VersionNotFoundError

if TYPE_CHECKING:
    from engram.store import Store, VersionInfo

Loader = Callable[..., Any]


class ModelHandle:
    """The model a ref names, loaded on first use, cached, and reloaded when the ref moves.

    Thread-safe: any number of threads may call :meth:`get` at once. At most one check
    or reload runs at a time; while it runs, the other threads get the cached model
    (only the first load makes them wait). A model and its :class:`VersionInfo` are
    swapped together, so :meth:`get` never pairs a model with another version's info.
    A model served once stays valid for whoever holds it after a reload.

    Args:
        store: a store path, opened read-only (no lock: a trainer may commit meanwhile)
            for the handle's life; a remote URL (``@REF``: the remote seen with its HEAD
            there, so ``ModelHandle("s3://b/p@prod")`` follows the remote's tag prod),
            read through a local copy for the handle's life; or an open
            :class:`~engram.store.Store`, used as it is and left open. The handle
            serialises its own calls on it; a ``Store`` is not thread-safe, so do not
            use that one from other threads meanwhile.
        ref: ``"HEAD"``, a tag, an id (``7``), ``"v0007"`` or ``"HEAD~1"``.
        device: where models go (passed to ``load``).
        check_every: seconds between two checks of the ref (0: every call;
            ``math.inf``: only on :meth:`refresh`).
        load: ``load(store, version_id, device=device) -> model``; by default
            :func:`engram.inference.load_model`.
        clock: the monotonic clock ``check_every`` is measured on.
        trust: a public key file (``KEYFILE.pub`` of ``engram keygen``): only versions
            whose manifest carries a valid signature by that key are loaded (checked
            before ``load`` is called); a ref moving to any other keeps the previous
            version serving.

    Raises:
        StoreNotFoundError, NotAStoreError, StoreFormatError: opening ``store`` failed.
        RemoteError, VersionNotFoundError: the remote cannot be read, or has no such
            ``@REF``.
        EngramError: ``trust`` is not a readable ed25519 public key.
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        ref: int | str = "HEAD",
        *,
        device: Any = "cpu",
        check_every: float = 1.0,
        load: Loader | None = None,
        clock: Callable[[], float] = time.monotonic,
        trust: str | os.PathLike[str] | None = None,
    ) -> None:
        from engram.store import Store
        from engram.store.store import is_valid_tag_name

        if not check_every >= 0:
            raise ValueError(f"check_every must be >= 0 seconds, not {check_every!r}")
        if load is None:
            from engram.inference import load_model as load
        self._trusted = None
        if trust is not None:  # read once, here: a bad key file fails at construction
            from engram.store.signing import load_trusted

            self._trusted = load_trusted(trust)
        self._owned = not isinstance(store, Store)
        self._remote = isinstance(store, str) and "://" in store
        if self._remote:
            from engram.store.remote.cache import RemoteStore

            self.store: Store = RemoteStore.open_url(store)  # type: ignore[arg-type]
        else:
            self.store = Store.open(store, mode="r") if self._owned else store  # type: ignore[arg-type]
        self.ref, self.device, self.check_every = ref, device, float(check_every)
        self._load, self._clock = load, clock
        # A tag's current id is one read of the refs (~4 us); resolving any other ref
        # reads a manifest too (~15 us). A valid tag name is never also a version name.
        self._is_tag = is_valid_tag_name(ref)
        self._lock = threading.Lock()
        self._current: tuple[Any, VersionInfo] | None = None  # swapped as one object
        self._last_check = -math.inf
        self._warned: tuple[Any, ...] | None = None  # the failure last warned about
        self._closed = False

    @property
    def model(self) -> Any:
        """The current model (see :meth:`get`)."""
        return self.get()[0]

    @property
    def version(self) -> VersionInfo | None:
        """The version the cached model came from; None before the first load."""
        current = self._current
        return None if current is None else current[1]

    @property
    def card(self) -> str:
        """The model card (Markdown with YAML front matter, :mod:`engram.card`) of the
        version served: loads or reloads first, as :meth:`get` does."""
        from engram.card import card_text

        info = self.get()[1]
        with self._lock:  # the handle serialises its own calls on the store
            return card_text(self.store, info.id)

    def get(self) -> tuple[Any, VersionInfo]:
        """The current model and the version it came from, loading or reloading first
        if a check is due.

        Raises:
            VersionNotFoundError, CorruptionError, EngramError: only while nothing is
                cached (the first load); later failures keep the cached model serving.
        """
        current = self._current
        if current is not None and not self._closed:
            if self._clock() - self._last_check < self.check_every:
                return current
            if not self._lock.acquire(blocking=False):
                return current  # another thread checks or reloads: no waiting for it
        else:
            self._lock.acquire()
        try:
            if self._closed:
                raise EngramError(f"{self!r} is closed")
            if self._current is None or self._clock() - self._last_check >= self.check_every:
                self._check()
            assert self._current is not None
            return self._current
        finally:
            self._lock.release()

    def predict(self, x: Any) -> tuple[Any, VersionInfo]:
        """Class labels for a batch ``x`` from the current model, and the version that
        answered. ``x`` is checked against the version's recorded signature first
        (:mod:`engram.signature`), so a wrong shape is one clear
        :class:`~engram.signature.SignatureError`, not a traceback from NumPy or torch.
        A scikit-learn estimator's ``predict``; a torch model's argmax (as int64)."""
        from engram.signature import check_input

        model, info = self.get()
        check_input(info.meta.get("signature"), x, what=f"{self.store.path} {info.name}")
        if hasattr(model, "predict"):
            return model.predict(x), info
        import torch

        with torch.no_grad():
            inputs = torch.as_tensor(x, dtype=torch.float32)
            return model(inputs).argmax(dim=-1).cpu().numpy(), info

    def refresh(self) -> bool:
        """Check the ref now (waiting for a reload in progress); True if a version was
        loaded. Raises like :meth:`get` while nothing is cached."""
        with self._lock:
            if self._closed:
                raise EngramError(f"{self!r} is closed")
            return self._check()

    def close(self) -> None:
        """Close the store if the handle opened it; :meth:`get` raises afterwards."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._owned:
                    self.store.close()

    def __enter__(self) -> ModelHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.store.path)
        if self._remote:  # what was asked for, not the local copy's directory
            url, at = self.store.url, self.store.at  # type: ignore[attr-defined]
            where = url + (f"@{at}" if at else "")
        return f"ModelHandle({where!r}, {self.ref!r})"

    # ---------------------------------------------------------------- internals

    def _check(self) -> bool:
        """Resolve the ref; load what it names if that is new. Holds ``self._lock``."""
        from engram.store import version_name

        self._last_check = self._clock()
        current = self._current
        try:
            vid, info = self._resolve()
        except Exception as e:
            if current is None:
                raise
            what = f"the ref no longer resolves ({type(e).__name__}: {e})"
            self._warn(("ref", type(e)), what, current[1])
            return False
        if current is not None and vid == current[1].id:
            self._warned = None
            return False
        try:  # by id from here on: a tag moving meanwhile cannot mix two versions
            info = info if info is not None else self.store.info(vid)
            if self._trusted is not None:
                from engram.store.signing import require_signed

                require_signed(self.store, vid, self._trusted)
            model = self._load(self.store, vid, device=self.device)
        except Exception as e:
            if current is None:
                raise
            what = f"loading {version_name(vid)} failed ({type(e).__name__}: {e})"
            self._warn((vid, type(e)), what, current[1])
            return False
        self._current = (model, info)
        self._warned = None
        return True

    def _resolve(self) -> tuple[int, VersionInfo | None]:
        if self._remote:  # one read of the remote; its copy is brought up to date if it moved
            self.store.refresh(self.ref)  # type: ignore[attr-defined]
        if self._is_tag:
            vid = self.store.tags().get(self.ref)  # type: ignore[arg-type]
            if vid is None:
                raise VersionNotFoundError(f"no tag {self.ref!r} in store {self.store.path}")
            return vid, None
        info = self.store.info(self.ref)
        return info.id, info

    def _warn(self, key: tuple[Any, ...], what: str, serving: VersionInfo) -> None:
        if key != self._warned:  # once per failure, not once per retry
            self._warned = key
            warnings.warn(
                f"{self!r}: {what}; still serving {serving.name}, retrying at the next check",
                stacklevel=4,
            )
