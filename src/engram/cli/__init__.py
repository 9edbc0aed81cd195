"""The ``engram`` command: inspect, verify, tag, roll back, collect and export a store.

    engram ls runs/ewc                       # versions, HEAD marked
    engram show runs/ewc prod                # one version: meta, state, metrics
    engram show runs/ewc prod --card         # its model card (Markdown + YAML front matter)
    engram diff runs/ewc HEAD~1 HEAD         # tensors changed, replay samples in/out
    engram export runs/ewc prod --out model.safetensors
    engram compact runs/ewc                  # old versions delta-coded, restorable bit-exactly
    engram verify runs/ewc --all --trust key.pub   # every version signed by that key

Every command takes ``--json`` (stable keys, for scripts). Exit codes: 0 success,
1 ``verify`` found a problem, 2 a user error (unknown version, not a store, corrupted
data, bad arguments, a file that cannot be written) or an OS fault (a full disk, a
read-only file system, a permission: :mod:`engram.faults`), reported in one line
without a traceback. With ``--json`` a failure also prints one JSON document on stdout,
``{"error": "<the message>", "exit": <the exit code>}`` (``verify`` adds the two keys to
its report), so a script reads stdout whatever happened; the one line still goes to stderr.

This module holds the parser and :func:`main`; each group of subcommands is one module
that computes a plain result (what ``--json`` prints) and, separately, prints it as
text: :mod:`~engram.cli.history` (ls, show), :mod:`~engram.cli.diff`,
:mod:`~engram.cli.integrity` (verify, upgrade), :mod:`~engram.cli.refs` (tag, rollback),
:mod:`~engram.cli.maintenance` (gc, compact, du), :mod:`~engram.cli.export` and
:mod:`~engram.cli.cache` (the local copies of remotes); their
shared store helpers are in :mod:`~engram.cli.common`, exit codes and printing in
:mod:`~engram.cli.output`.

This module imports nothing heavy: ``engram --help`` stays fast, and only the module of
the subcommand run is imported. The inspection commands (ls, show, verify, du, diff,
tag, rollback, export --format safetensors) import neither torch nor Avalanche
(``tests/test_cli_imports.py``): torch comes in only to run a model (export --format
onnx), Avalanche only to load a model whose spec needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from engram.cli.output import EXIT_OK, EXIT_USAGE, UsageError, emit_json
from engram.errors import EngramError
from engram.faults import describe

_RETRY = "run the command again"


class _ArgumentError(UsageError):
    """argparse rejected the command line (reported by :func:`main`, JSON or not)."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        raise _ArgumentError(f"{message} (see {self.prog} --help)", self.prog)


def _parser() -> argparse.ArgumentParser:
    """Every subcommand and option. Long because it is the CLI's whole surface, a line or
    two per option, in one place."""
    parser = _Parser(
        prog="engram",
        description="Inspect and manage an engram store: versions, tags, integrity, "
        "garbage collection, disk usage, and exporting a model for deployment.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, module: str, version: str | None = None) -> _Parser:
        """A subcommand run by the function ``name`` of ``engram.cli.<module>``."""
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("store", metavar="STORE", help="the store directory")
        if version is not None:
            p.add_argument(
                "version",
                metavar="VERSION",
                nargs="?",
                default="HEAD",
                help=f"{version} (default HEAD); an id, vNNNN, HEAD~N or a tag",
            )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(module=module)
        return p

    p = command("ls", "List the versions (HEAD marked with *).", "history")
    p.add_argument("--all", action="store_true", help="every version (default: the newest "
                   "50; the listing says how many there are)")  # fmt: skip
    p = command("show", "Summarise one version: meta, model, state, metrics.", "history",
                "the version")  # fmt: skip
    p.add_argument("--card", action="store_true", help="print the version's model card "
                   "(Markdown with YAML front matter) instead")  # fmt: skip
    p = command("verify", "Re-hash what a version references.", "integrity", "the version")
    p.add_argument("--all", action="store_true", help="every version and every stored blob")
    p.add_argument("--untrusted", action="store_true", help="open and verify in a child "
                   "process: an LMDB crash is reported, exit 1")  # fmt: skip
    p.add_argument("--trust", metavar="PUBKEY", help="the public key file (KEYFILE.pub of "
                   "`engram keygen`) every version checked must be signed by")  # fmt: skip
    p = command("rollback", "Move HEAD to a version (later ones stay until gc).", "refs")
    p.add_argument("version", metavar="VERSION", help="the version HEAD moves to")
    p = command("tag", "Point a tag at a version, or delete it (STORE may be a remote URL: "
                "its tag is moved there).", "refs")  # fmt: skip
    p.add_argument("name", metavar="NAME", help="the tag (letters, digits, . _ -)")
    p.add_argument("version", metavar="VERSION", nargs="?", default=None, help="default HEAD")
    p.add_argument("--delete", action="store_true", help="delete the tag")
    p = command("diff", "What changed between two versions.", "diff")
    p.add_argument("a", metavar="A", help="the older version")
    p.add_argument("b", metavar="B", help="the newer version")
    p = command("gc", "Delete unreachable data (never HEAD or tagged versions); on a remote "
                "URL, the objects no remote ref reaches.", "maintenance")  # fmt: skip
    p.add_argument("--keep-last", type=int, metavar="N", help="also drop all but the N newest")
    p.add_argument("--dry-run", action="store_true", help="remote: say what would be removed")
    p.add_argument("--grace", metavar="AGE", help="remote: keep unreferenced objects younger "
                   "than AGE (default 24h; 0, 90s, 30m, 7d)")  # fmt: skip
    p = command("compact", "Delta-code the history (lossless; HEAD stays a plain file).",
                "maintenance")  # fmt: skip
    p.add_argument("--tagged", action="store_true", help="compact tagged versions too")
    command("du", "Bytes per component, logical vs on disk, deduplication ratio.", "maintenance")
    command("upgrade", "Seal every LMDB record of an older store with a checksum (format 3).",
            "integrity")  # fmt: skip
    p = command("export", "Write a self-contained deployable model.", "export", "the version")
    p.add_argument(
        "--format",
        choices=("safetensors", "onnx", "skops", "joblib"),
        help="default: from --out (.onnx, .skops, .joblib; else safetensors); "
        "skops/joblib for scikit-learn versions (joblib is pickle-based)",
    )
    p.add_argument(
        "--allow-version-mismatch",
        action="store_true",
        help="export a scikit-learn model written by another scikit-learn version",
    )
    p.add_argument("--out", required=True, metavar="PATH", help="the file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p = sub.add_parser("keygen", help="Write an ed25519 key for signing versions.",
                       description="Write an ed25519 private key (mode 0600) to KEYFILE and "
                       "its public key to KEYFILE.pub, for signed versions.")  # fmt: skip
    # as `out`: the file an I/O error names is the key file (see main)
    p.add_argument("out", metavar="KEYFILE", help="the private key file (must not exist)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(module="integrity", store="")
    # the remote (engram.cli.remote): object storage, s3://BUCKET/PREFIX (gs://, az://)
    p = command("push", "Upload the versions the remote lacks; move its HEAD.", "remote")
    p.add_argument("remote", metavar="REMOTE", nargs="?", default=None,
                   help="s3://BUCKET/PREFIX (default: the store's remote, from its last push "
                   "or pull)")  # fmt: skip
    p = sub.add_parser("pull", help="Clone a remote into a store, or update the clone.",
                       description="Clone a remote into a store, or update the clone.")  # fmt: skip
    p.add_argument("remote", metavar="REMOTE", help="s3://BUCKET/PREFIX (gs://, az://)")
    p.add_argument("store", metavar="STORE", nargs="?", default="",
                   help="the store directory (default: the prefix's last name)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(module="remote")
    # the local copies of remotes that `engram ls s3://...` and load_model read through
    p = sub.add_parser("cache", help="List or prune the local copies of remotes.",
                       description="List or prune the local copies of remotes (in "
                       "$ENGRAM_CACHE, else ~/.cache/engram/remotes).")  # fmt: skip
    p.set_defaults(module="cache", store="")
    cache = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    q = cache.add_parser("ls", help="Each copy: its remote, size, versions, last sync.")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q = cache.add_parser("prune", help="Remove copies, or the files they fetched.",
                         description="Remove copies (--all), or the files they fetched that "
                         "HEAD, tagged versions and the N newest do not need (--keep-last "
                         "N); a copy open in a process is left as it is.")  # fmt: skip
    q.add_argument("url", metavar="URL", nargs="?", default=None,
                   help="the remote whose copy to prune (default: every copy)")  # fmt: skip
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep-last", type=int, metavar="N", help="keep the files of the N "
                     "newest versions (and HEAD's and tagged ones); the records stay")  # fmt: skip
    how.add_argument("--all", action="store_true", help="remove the whole copy")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``engram`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv  # before parsing: a usage error is reported as JSON too
    try:
        args = _parser().parse_args(argv)
    except _ArgumentError as e:
        return _fail(str(e), EXIT_USAGE, as_json, prog=e.prog)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    as_json = args.json
    # what an I/O error that names no file was writing: the exported file, else the store
    target = getattr(args, "out", None) or args.store
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return _command(args.module, args.command)(args)
    except EngramError as e:  # (or an OS fault behind it, e.g. a store "not readable")
        return _fail(describe(e, target, _RETRY) or str(e), EXIT_USAGE, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, as_json)
    except BrokenPipeError:  # `engram ls ... | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as e:
        # An OS fault (a full disk, a read-only file system, a permission): the store is as
        # it was before the command (docs/reliability.md, "OS faults"), so say what to fix.
        message = describe(e, target, _RETRY)
        if message is not None:
            return _fail(message, EXIT_USAGE, as_json)
        # a bug: the traceback follows, but the script still gets JSON
        if as_json:
            emit_json({"error": f"internal error: {type(e).__name__}: {e}", "exit": 1})
        raise


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The function running subcommand ``name``, importing only its module."""
    return getattr(importlib.import_module(f"engram.cli.{module}"), name)


def _one_line_warnings(fallback: Callable[..., None]) -> Callable[..., None]:
    """A ``showwarning`` printing engram's own warnings (a remote served from its local
    copy, ...) as one line; others go to ``fallback``."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:  # fmt: skip
        if filename.startswith(_PACKAGE):
            print(f"engram: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _fail(message: str, code: int, as_json: bool, prog: str = "engram") -> int:
    """Report an error in one line (and as JSON on stdout with ``--json``); returns ``code``."""
    message = " ".join(message.split())
    if as_json:
        emit_json({"error": message, "exit": code})
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code
