"""Serve a stored model: load once, predict many times, pick up a newly promoted version.

    python experiments/serve.py runs/ewc --tag prod            # predicts on sklearn digits
    engram tag runs/ewc prod v0005 && kill -HUP <pid>          # promote, then reload

The server follows a ref (a tag such as ``prod``, or ``HEAD``). ``reload()`` (called on
SIGHUP) re-resolves it and loads the version only if the ref moved; a failed load
(a corrupted checkpoint, a spec that no longer builds) keeps the model being served.
The store is opened read-only, so a trainer may keep committing to it meanwhile.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import torch

from engram import load_model
from engram.errors import EngramError
from engram.store import Store, version_name


class Server:
    """Predictions from the version a ref names, reloaded when asked."""

    def __init__(self, store: str, ref: str = "prod") -> None:
        self.store, self.ref = store, ref
        self.version: int | None = None
        self.model: torch.nn.Module | None = None
        self._reload_requested = False
        self.reload()

    def reload(self) -> bool:
        """Load the version ``ref`` names now, if it moved; True when a new one was loaded."""
        with Store.open(self.store) as store:
            version = store.info(self.ref).id
            if version == self.version:
                return False
            model = load_model(store, version)
        self.model, self.version = model, version  # swap only once the new model is ready
        return True

    def request_reload(self, *_: object) -> None:
        """Signal-safe: the reload happens before the next prediction."""
        self._reload_requested = True

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self._reload_requested:
            self._reload_requested = False
            try:
                if self.reload():
                    print(f"reloaded {self.ref} = {version_name(self.version)}", flush=True)
            except EngramError as e:
                print(
                    f"reload failed, still serving {version_name(self.version)}: {e}",
                    file=sys.stderr,
                    flush=True,
                )
        with torch.inference_mode():
            return self.model(x).argmax(dim=1)  # (B,)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--tag", default="prod", help="the ref to serve (a tag or HEAD)")
    parser.add_argument("--batches", type=int, default=0, help="stop after N (0: run forever)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between batches")
    args = parser.parse_args(argv)
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)  # (N, 64), as engram-train sees them
    y = torch.tensor(y)
    try:
        server = Server(args.store, args.tag)
    except EngramError as e:
        sys.exit(f"serve: {e}")
    signal.signal(signal.SIGHUP, server.request_reload)
    print(f"serving {args.tag} = {version_name(server.version)}", flush=True)
    gen = torch.Generator().manual_seed(0)
    n = 0
    while args.batches == 0 or n < args.batches:
        batch = torch.randint(len(y), (64,), generator=gen)
        accuracy = (server.predict(x[batch]) == y[batch]).float().mean().item()
        print(f"{version_name(server.version)} batch {n} accuracy {accuracy:.3f}", flush=True)
        n += 1
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
