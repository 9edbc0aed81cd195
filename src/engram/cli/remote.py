"""``engram push`` and ``pull``: a store and its remote in object storage.

    engram push runs/ewc s3://bucket/runs/ewc    # the first time; remembered afterwards
    engram push runs/ewc                         # uploads only what the versions add
    engram pull s3://bucket/runs/ewc runs/ewc    # clone (or update) on another machine
    engram push runs/ewc file:///mnt/shared/ewc  # a directory (a shared mount) as the remote

Tags on versions the remote holds are pushed too (except one deleted on the remote at
the version the store's tag still names); a pull creates the remote's tags the store
lacks. A remote's own tags: ``engram tag URL NAME [VERSION] [--delete]``
(:mod:`engram.cli.refs`); its gc: ``engram gc URL`` (:mod:`engram.cli.maintenance`).
Reading a remote without a store (``engram ls s3://...``) is
:mod:`engram.store.remote.cache`.

The protocol is in :mod:`engram.store.remote` and docs/remote.md. Credentials come from
the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, an instance role;
``AWS_ENDPOINT_URL`` for an S3-compatible server) or an AWS profile (``AWS_PROFILE``,
through boto3); nothing here prints one.
"""

from __future__ import annotations

import argparse
from typing import Any

from engram.cli.output import EXIT_OK, UsageError, emit_json, human_bytes
from engram.store import version_name
from engram.store.remote import pull as _pull
from engram.store.remote import push as _push
from engram.store.remote.pull import default_store


def push(args: argparse.Namespace) -> int:
    result = _push(args.store, args.remote).to_json()
    return _show(args, result, _print_push)


def pull(args: argparse.Namespace) -> int:
    store = args.store or default_store(args.remote)
    if not store:
        raise UsageError(f"pull {args.remote}: name the STORE directory to clone into")
    args.store = store  # what an OS fault names
    return _show(args, _pull(args.remote, store).to_json(), _print_pull)


def _show(args: argparse.Namespace, result: dict[str, Any], show: Any) -> int:
    if args.json:
        emit_json(result)
    else:
        show(result)
    return EXIT_OK


def _print_push(result: dict[str, Any]) -> None:
    head = version_name(result["head"]) if result["head"] is not None else "none"
    tags = f"; tags moved: {', '.join(result['tags'])}" if result["tags"] else ""
    if not result["pushed"]:
        print(f"{result['remote']} is up to date (HEAD {head}){tags}")
    else:
        names = ", ".join(version_name(v) for v in result["pushed"])
        print(
            f"pushed {names} to {result['remote']} ({human_bytes(result['uploaded_bytes'])} "
            f"in {result['objects']} objects); remote HEAD -> {head}{tags}"
        )
    for name in result.get("tags_deleted_on_remote", []):
        print(
            f"tag {name} was deleted on {result['remote']} at the version it names here: "
            f"left deleted (tag another version to push it, or `engram tag {result['remote']} "
            f"{name} VERSION`)"
        )


def _print_pull(result: dict[str, Any]) -> None:
    head = version_name(result["head"])
    tags = f"; tags created: {', '.join(result['tags'])}" if result["tags"] else ""
    if not result["pulled"]:
        print(f"{result['store']} is up to date with {result['remote']} (HEAD {head}){tags}")
        return
    names = ", ".join(version_name(v) for v in result["pulled"])
    print(
        f"pulled {names} from {result['remote']} into {result['store']} "
        f"({human_bytes(result['downloaded_bytes'])}); HEAD -> {head}{tags}"
    )
