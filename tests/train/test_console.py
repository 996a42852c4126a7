"""The console's lines stay whole when several ranks write to one pipe at once (train.console.write_whole)."""
from __future__ import annotations

import io
import os
import subprocess
import sys

from qwen3vl.train.console import write_whole

# One rank's failure line as long as a dataset error's (~1.5 KB), written many times once every rank
# is ready (a byte on stdin), so that the ranks' writes overlap; with ``print`` (the line and its newline
# written separately) some ran together.
_RANK = r'''
import sys
from qwen3vl.train.console import write_whole
rank, LINES = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.read(1)
for i in range(LINES):
    write_whole(f"[qwen3vl-train] rank {rank} line {i} " + "x" * 1500)
'''

_LINES = 2000


def test_lines_from_four_processes_on_one_pipe_arrive_whole():
    read_end, write_end = os.pipe()
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, str(rank), str(_LINES)], stdin=subprocess.PIPE, stderr=write_end)
             for rank in range(4)]
    os.close(write_end)
    for rank in ranks:  # all started: go
        rank.stdin.write(b"g")
        rank.stdin.close()
    with os.fdopen(read_end, "rb") as pipe:
        lines = pipe.read().decode().splitlines()
    assert [rank.wait() for rank in ranks] == [0, 0, 0, 0]
    assert len(lines) == 4 * _LINES
    broken = [line[:80] for line in lines
              if not line.startswith("[qwen3vl-train] rank ") or line.count("[qwen3vl-train]") != 1
              or not line.endswith(" " + "x" * 1500)]
    assert not broken, f"{len(broken)} lines ran together, e.g. {broken[:2]}"
    for rank in range(4):
        assert sorted(int(line.split()[4]) for line in lines if line.split()[2] == str(rank)) == list(range(_LINES))


def test_a_stream_without_a_descriptor_gets_the_line_and_its_newline():
    stream = io.StringIO()  # as under pytest's capture
    write_whole("one", stream)
    write_whole("two\n", stream)
    assert stream.getvalue() == "one\ntwo\n"
