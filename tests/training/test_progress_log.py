"""Run output captured to a file is readable: progress bars are drawn on a terminal only,
and each experience is one line (its accuracy row and seconds)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

RUN = ["training.epochs=1", "logger=none", "benchmark.n_experiences=2"]


def test_off_a_terminal_no_bar_frames_and_one_line_per_experience(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engram.train", f"store.path={tmp_path / 's'}", *RUN],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "batch/s" not in out.stderr, out.stderr[-500:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("experience ")]
    assert len(lines) == 2
    assert all(
        re.fullmatch(r"experience \d: accuracy( \d\.\d\d)+ \(\d+\.\d s\)", ln) for ln in lines
    )


def test_on_a_terminal_the_bar_is_drawn(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    # a new pty is 0 columns wide, on which tqdm draws nothing: give it a terminal's size
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "engram.train", f"store.path={tmp_path / 's'}", *RUN],
            stdout=subprocess.DEVNULL, stderr=terminal,
        )  # fmt: skip
        os.close(terminal)
        seen = b""
        while True:  # until the child closes its end (EIO on Linux)
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        assert child.wait(timeout=300) == 0
    finally:
        os.close(controller)
    assert b"batch/s" in seen and b"\r" in seen
