"""``engram verify``, ``upgrade`` and ``keygen``: re-hashing what versions reference
(and, with ``--trust``, checking their signatures), sealing an older store's LMDB records
with checksums, and making a signing key."""

from __future__ import annotations

import argparse
from typing import Any

from engram.cli.common import open_store
from engram.cli.output import EXIT_OK, EXIT_PROBLEMS, UsageError, emit_json, human_bytes
from engram.errors import StoreNotFoundError
from engram.store import Store, VerifyReport, version_name

# ------------------------------------------------------------------ verify


def verify(args: argparse.Namespace) -> int:
    result, fatal = verify_store(
        args.store, args.version, all_versions=args.all, untrusted=args.untrusted, trust=args.trust
    )
    if args.json:
        emit_json(result)
    else:
        print_verify(result, all_versions=args.all, fatal=fatal)
    return EXIT_OK if result["ok"] else EXIT_PROBLEMS


def verify_store(
    path: str, version: str, *, all_versions: bool, untrusted: bool, trust: str | None = None
) -> tuple[dict[str, Any], str | None]:
    """The verify report as ``--json`` prints it (with ``error`` and ``exit`` when it
    fails), and, with ``untrusted``, the one line saying why the store could not be read
    through (None if it could). ``trust``: a public key file every version checked must
    be signed by."""
    report: VerifyReport
    fatal = None
    key_id = None
    if trust is not None:  # a bad key file is the user's error (exit 2), not a problem
        from engram.store.signing import load_trusted

        key_id = load_trusted(trust).key_id
    remote = None
    if "://" in path:  # a remote: its objects (--all), then its local copy as a store
        if untrusted:
            raise UsageError(
                f"--untrusted is for a local store: a remote is read into a local copy "
                f"engram writes itself; run `engram verify {path}` without it"
            )
        from engram.store.remote.verify import verify_remote

        report, check = verify_remote(path, version, all=all_versions, trust=trust)
        remote = None if check is None else check.to_json()
    elif untrusted:  # a child process opens and verifies: an LMDB crash is a problem
        from engram.store.untrusted import verify_in_child

        try:
            child = verify_in_child(path, version, all=all_versions, trust=trust)
        except StoreNotFoundError:
            raise UsageError(f"no store at {path}: the path does not exist") from None
        report, fatal = child, child.fatal
    else:
        with open_store(path) as store:
            report = store.verify(version, all=all_versions, trust=trust)
    result: dict[str, Any] = {
        "ok": report.ok,
        "versions": [version_name(v) for v in report.versions],
        "blobs": report.blobs,
        "bytes": report.bytes,
        "problems": [
            {
                "version": None if p.version is None else version_name(p.version),
                "where": p.where,
                "message": p.message,
            }
            for p in report.problems
        ],
        "notes": list(report.notes),
        "trusted_key": key_id,
    }
    if remote is not None:  # verify REMOTE --all: every object it references, re-hashed
        result["remote"] = remote
    if not report.ok:  # what every failing command prints with --json
        first = " ".join(str(report.problems[0]).split())
        result["error"] = fatal or f"{len(report.problems)} problem(s), the first: {first}"
        result["exit"] = EXIT_PROBLEMS
    return result, fatal


def print_verify(result: dict[str, Any], *, all_versions: bool, fatal: str | None) -> None:
    if fatal is not None:
        print(" ".join(fatal.split()))
        return
    problems = result["problems"]
    what = "all versions" if all_versions else ", ".join(result["versions"])
    status = "ok" if result["ok"] else f"{len(problems)} problem(s)"
    remote = result.get("remote")
    if remote is not None:
        print(
            f"remote {remote['url']}: {remote['objects']} objects, "
            f"{human_bytes(remote['bytes'])} downloaded and re-hashed"
        )
    print(
        f"{what}: {status} — {result['blobs']} chunks and the checkpoint files, "
        f"{human_bytes(result['bytes'])} re-hashed"
    )
    for p in problems:  # as engram.store.Problem prints itself
        print(f"  {p['version'] or 'store'} {p['where']}: {p['message']}")
    for note in result["notes"]:
        print(f"note: {note}")
    if result.get("trusted_key"):
        print(f"signatures checked against key {result['trusted_key']}")
    if not result["ok"]:
        print("roll back to a version that verifies (`engram rollback`), or restore the files")


# ------------------------------------------------------------------ upgrade


def upgrade(args: argparse.Namespace) -> int:
    with open_store(args.store, mode="w") as store:
        result = upgrade_store(store)
        head = store.head
    if args.json:
        emit_json(result)
    else:
        print_upgrade(result, args.store, head=head.name if head else "none")
    return EXIT_OK


def upgrade_store(store: Store) -> dict[str, Any]:
    """Seal every LMDB record with a checksum (format 3); how many were sealed."""
    sealed = store.upgrade()
    return {"sealed_records": sealed, "format_version": store.env.format_version}


def print_upgrade(result: dict[str, Any], path: str, *, head: str) -> None:
    if result["sealed_records"]:
        print(f"{path}: {result['sealed_records']} LMDB records sealed with checksums; format "
              f"{result['format_version']} (HEAD {head}, every version kept)")  # fmt: skip
    else:
        print(f"{path}: already format {result['format_version']} (every record sealed)")


# ------------------------------------------------------------------ keygen


def keygen(args: argparse.Namespace) -> int:
    """Write an ed25519 signing key (mode 0600) and its public key beside it."""
    from engram.store.signing import generate_key

    public, key_id = generate_key(args.out)
    result = {"private_key": args.out, "public_key": str(public), "key_id": key_id}
    if args.json:
        emit_json(result)
    else:
        print(f"wrote {args.out} (private, mode 0600: keep it off the store) and {public}")
        print(f"key id {key_id}; sign with store.signing_key={args.out} or "
              f"Store.sign_with(); check with `engram verify STORE --trust {public}`")  # fmt: skip
    return EXIT_OK
