"""What a simulated host's shell received: every SSH command line and the argv of the programs it ran.

Every SSH command of a lab host goes through sshd's ``ForceCommand`` (``tools/record/esxisim-session``),
which records nothing until a test creates ``HOSTDIR/run/record`` (``/run/esxisim/record`` inside the
host). While that directory exists:

* ``record/lines``: each command line exactly as the client sent it, with an id (the pid of the shell
  that runs it);
* ``record/argv``: for each program of ``tools/record`` (``dd``, ``vim-cmd``, ``vmkfstools``, ``cat``,
  ``mv``, ``sh``, ``python`` …, symbolic links to ``esxisim-argv``, first on ``PATH`` while recording), the
  argv it received after the shell parsed the line: the line's id, the depth (0: run by the line itself;
  1: by a program the line ran, e.g. the ``cat`` of ``sh -c 'cat > "$1"'``) and the arguments.

Both files are NUL-separated (no argument can hold a NUL), so line breaks and any bytes in names come
back exactly. Shell builtins (``test``, ``echo``) run no program and are only in ``lines``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RECORDED_PROGRAMS = frozenset(
    p.name for p in (Path(__file__).resolve().parent / "tools" / "record").iterdir() if p.is_symlink()
)
"""The programs whose argv is recorded (the links in ``tools/record``)."""


@dataclass(frozen=True)
class Line:
    id: str
    text: str


@dataclass(frozen=True)
class Exec:
    """One program started while recording."""

    line: str
    """Id of the command line it belongs to."""
    depth: int
    argv: tuple[str, ...]
    """``argv[0]`` is the program's name (``dd``), the rest what it received."""


def _fields(raw: bytes, what: str) -> list[str]:
    if raw and not raw.endswith(b"\0"):
        raise ValueError(f"{what}: a record is cut off")
    return [f.decode("utf-8", "surrogateescape") for f in raw.split(b"\0")[:-1]]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


class ShellRecording:
    """The record of one host (``HOSTDIR/run/record``); :meth:`start` and :meth:`stop` switch it. After
    :meth:`stop` the record stays readable (it is kept in memory)."""

    def __init__(self, host_dir: Path) -> None:
        self.dir = host_dir / "run" / "record"
        self._kept: dict[str, bytes] | None = None

    def start(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(mode=0o755)
        self._kept = None

    def stop(self) -> None:
        self._kept = {name: _read(self.dir / name) for name in ("lines", "argv")}
        shutil.rmtree(self.dir, ignore_errors=True)

    def _raw(self, name: str) -> bytes:
        return self._kept[name] if self._kept is not None else _read(self.dir / name)

    def lines(self) -> list[Line]:
        fields = _fields(self._raw("lines"), str(self.dir / "lines"))
        if len(fields) % 2:
            raise ValueError(f"{self.dir / 'lines'}: odd number of fields")
        return [Line(fields[i], fields[i + 1]) for i in range(0, len(fields), 2)]

    def execs(self) -> list[Exec]:
        fields = _fields(self._raw("argv"), str(self.dir / "argv"))
        out: list[Exec] = []
        i = 0
        while i < len(fields):
            line, depth, count = fields[i], int(fields[i + 1]), int(fields[i + 2])
            argv = tuple(fields[i + 3 : i + 4 + count])
            if len(argv) != count + 1:
                raise ValueError(f"{self.dir / 'argv'}: a record is cut off")
            out.append(Exec(line, depth, argv))
            i += 4 + count
        return out


@contextlib.contextmanager
def recording(host_dir: Path) -> Iterator[ShellRecording]:
    """Record what the host's shell receives for the duration of the block."""
    rec = ShellRecording(host_dir)
    rec.start()
    try:
        yield rec
    finally:
        rec.stop()
