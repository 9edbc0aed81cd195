"""Opening a store that may be damaged: never a SIGBUS, never a dead interpreter.

LMDB maps ``data.mdb`` and trusts what it finds there. Two kinds of damage kill the
process that reads it instead of raising an error:

* a **truncated** ``data.mdb`` (an interrupted copy): pages LMDB's last committed
  transaction uses lie past the end of the file, and touching them is a SIGBUS.
  :func:`check_not_truncated` reads the two meta pages with plain ``read`` calls and
  compares the file's size with what the newest one needs, before LMDB maps anything;
* **damaged pages** (flipped bytes in the B-tree): LMDB's C code may follow a bad
  offset or length anywhere (SIGSEGV/SIGBUS). Nothing in-process can catch that, so
  :func:`verify_in_child` (``engram verify --untrusted``) opens and verifies the store
  in a fresh interpreter and reports a crash as a problem found.

The meta pages are read by :mod:`engram.store.meta`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.errors import (
    EngramError,
    NotAStoreError,
    StoreNotFoundError,
    VersionNotFoundError,
)
from engram.store import format as fmt
from engram.store.meta import check_not_truncated
from engram.store.values import Problem, VerifyReport, VersionSpec

# ------------------------------------------------------------ verify in a child


DEFAULT_TIMEOUT = 3600.0  # a full verify re-hashes every byte: ~1 GiB/s on one core

# Errors the child reports that are about the request, not the store's bytes: raised
# again in the parent, as the in-process verify would raise them.
_USER_ERRORS: dict[str, type[EngramError]] = {
    "StoreNotFoundError": StoreNotFoundError,
    "NotAStoreError": NotAStoreError,
    "VersionNotFoundError": VersionNotFoundError,
}

# The child could not read the store (the file modes, not its bytes): the parent raises
# the OSError, it does not report damage.
_ACCESS_ERRNOS = (errno.EACCES, errno.EPERM)

_CHILD = (
    "import resource, sys; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
    "from engram.store.untrusted import _child_main; _child_main(sys.argv[1:])"
)


@dataclass
class UntrustedReport(VerifyReport):
    """A :class:`VerifyReport` from :func:`verify_in_child`.

    ``fatal`` is set when the store could not be read through: the child crashed
    (SIGSEGV/SIGBUS in LMDB), timed out, or could not open it. It is then the one-line
    reason, also the report's only problem.
    """

    fatal: str | None = None


def verify_in_child(
    path: str | os.PathLike[str],
    version: VersionSpec = "HEAD",
    *,
    all: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    trust: str | os.PathLike[str] | None = None,
) -> UntrustedReport:
    """:meth:`Store.verify <engram.store.Store.verify>` of a store that may be damaged,
    in a fresh interpreter: this process never maps the store's LMDB file.

    The child (``sys.executable``, started with fork+exec, so no LMDB environment
    crosses a fork) checks the directory, checks that ``data.mdb`` is not truncated,
    opens the store read-only and verifies it; its report comes back as JSON. If LMDB
    crashes it, or it runs past ``timeout`` seconds (it is killed), or the store cannot
    be opened, the report has ``fatal`` set to one line saying so. ``trust``: a public
    key file, passed to the child's verify (signed versions). Long because each
    way the child can end (crash, timeout, refusal, a report) is answered here.

    Raises:
        StoreNotFoundError, NotAStoreError: the path is not a store directory.
        VersionNotFoundError: ``version`` names no version.
        PermissionError: this user may not read a file or directory of the store (its
            ``filename``): the store may be intact, so it is not reported as damage.
    """
    root = Path(path).expanduser()  # as given: messages name it; the child shares our cwd
    spec = json.dumps(version)
    env = dict(os.environ)
    # The child imports this very engram, whatever the current directory.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
    argv = [str(root), spec, "all" if all else "one"]
    if trust is not None:
        argv.append(os.path.abspath(trust))
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        phase = _last_phase(e.stdout or b"")
        return _fatal(
            f"store {root} could not be verified: the reader did not finish within "
            f"{timeout:g} s while {phase} it and was stopped (a damaged store can make "
            "LMDB loop; a very large one needs a longer timeout)"
        )
    messages = _messages(done.stdout)
    phase = _last_phase(done.stdout)
    if done.returncode < 0:
        sig = -done.returncode
        return _fatal(
            f"store {root} is corrupt: the reader crashed ({_signal_name(sig)}) while {phase} it"
        )
    result = next((m for m in reversed(messages) if "report" in m or "error" in m), None)
    if result is None:
        tail = " ".join(done.stderr.decode(errors="replace").split())[-300:]
        return _fatal(
            f"store {root} could not be verified: the reader exited with status "
            f"{done.returncode} while {phase} it ({tail or 'no message'})"
        )
    if "error" in result:
        kind, message = result["error"]["type"], result["error"]["message"]
        if kind in _USER_ERRORS and result["phase"] != "opening":
            raise _USER_ERRORS[kind](message)
        code = result["error"].get("errno")
        if code in _ACCESS_ERRNOS:  # as the in-process verify raises it (exit 2 in the CLI)
            raise OSError(code, os.strerror(code), result["error"].get("filename"))
        if kind in ("CorruptionError", "DamagedDatabaseError", "UnsafeStoreError",
                    "NotAStoreError", "StoreFormatError"):  # fmt: skip
            return _fatal(message if message.startswith("store ") else
                          f"store {root} is corrupt: {message}")  # fmt: skip
        if kind == "lmdb.Error":
            return _fatal(f"store {root} is corrupt: LMDB reports {message} while "
                          f"{result['phase']} it")  # fmt: skip
        return _fatal(
            f"store {root} is corrupt: the reader failed while {result['phase']} it "
            f"({kind}: {message})"
        )
    report = result["report"]
    return UntrustedReport(
        versions=report["versions"],
        blobs=report["blobs"],
        bytes=report["bytes"],
        problems=[Problem(p["version"], p["where"], p["message"]) for p in report["problems"]],
    )


def _fatal(message: str) -> UntrustedReport:
    return UntrustedReport(problems=[Problem(None, "reader", message)], fatal=message)


def _signal_name(sig: int) -> str:
    try:
        return f"signal {sig}, {signal.Signals(sig).name}"
    except ValueError:
        return f"signal {sig}"


def _messages(stdout: bytes) -> list[dict[str, Any]]:
    """The child's JSON lines (anything else on its stdout is ignored)."""
    out = []
    for line in stdout.decode(errors="replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            out.append(message)
    return out


def _last_phase(stdout: bytes) -> str:
    phases = [m["phase"] for m in _messages(stdout) if isinstance(m.get("phase"), str)]
    return phases[-1] if phases else "opening"


def _child_main(argv: list[str]) -> None:
    """The child of :func:`verify_in_child`: one JSON line per phase on stdout, then
    the report or the error. Never called in the parent."""
    # The store's modules import this one (env.py checks truncation): import them here,
    # in the child only, so that no module-level import runs in a circle.
    import lmdb

    from engram.store import Store
    from engram.store.env import prepare_directory

    root, version, all = Path(argv[0]), json.loads(argv[1]), argv[2] == "all"
    trust = argv[3] if len(argv) > 3 else None

    def send(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()  # what was sent survives a crash in the next phase

    phase = "checking"
    try:
        prepare_directory(root, "r", 0.0)
        phase = "opening"
        send({"phase": phase})
        check_not_truncated(root / fmt.LMDB_DIR)
        with Store.open(root, mode="r") as store:
            phase = "verifying"
            send({"phase": phase})
            report = store.verify(version, all=all, trust=trust)
    except Exception as e:
        kind = "lmdb.Error" if isinstance(e, lmdb.Error) else type(e).__name__
        error = {"type": kind, "message": str(e)}
        if isinstance(e, OSError) and e.errno in _ACCESS_ERRNOS:
            filename = None if e.filename is None else os.fsdecode(e.filename)
            error |= {"errno": e.errno, "filename": filename}
        send({"phase": phase, "error": error})
        return
    problems = [vars(p) for p in report.problems]
    send({"phase": "done", "report": {**vars(report), "problems": problems}})
