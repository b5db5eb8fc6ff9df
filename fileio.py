"""Files written whole or not at all, and outputs checked before any work starts.

Every file the toolkit writes (checkpoints, JSON results, plots) goes through ``atomic_write``:
the content is written to a temporary file beside the target, then renamed over it, so a crash
or Ctrl-C mid-write never leaves a truncated file and never touches the file that was there
before. Files are created with the user's umask (a teammate on shared storage can read them).

``check_outputs`` runs at the start of a script: every output must be writable (its folder can
be made, it is not a directory) and must not be one of the script's inputs, so that a typo
cannot overwrite a demo file or a checkpoint after an hour of training.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable


def _temporary_path(path: str) -> str:
    """A hidden sibling of ``path`` that keeps its extension (matplotlib and torch pick the
    format from it) and is unique to this process."""
    directory, name = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(name)
    return os.path.join(directory, f".{root}.tmp{os.getpid()}{ext}")


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp)`` to write the whole file to a temporary path, then rename it to
    ``path``; on any error (or interruption) the temporary file is removed and ``path`` is
    untouched. Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary_path(path)
    try:
        write(tmp)
        # some writers (safetensors) create their file 0600: every output gets the user's umask
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj, path: str) -> str:
    """``torch.save`` atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(path: str, obj) -> str:
    """JSON (indented) atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    return atomic_write(path, write)


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """A matplotlib figure atomically (format from the extension)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_writable(flag: str, path: str) -> None:
    """Refuse, before any work, an output that cannot be written: a directory, or a path under
    a file. Creates nothing."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory; give a file path")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {parent} is not writable")


def check_outputs(outputs: dict[str, str | None], inputs: dict[str, object]) -> None:
    """``outputs``: flag -> path (None: not written); ``inputs``: flag -> a path or a list of
    paths. Every output must be writable and differ from every input and from every other
    output; the error names both flags."""
    given = {flag: p for flag, p in outputs.items() if p}
    for flag, path in given.items():
        check_writable(flag, path)
    flat_inputs = []
    for flag, value in inputs.items():
        for p in ([value] if isinstance(value, (str, os.PathLike)) else list(value or [])):
            flat_inputs.append((flag, str(p)))
    for flag, path in given.items():
        for in_flag, in_path in flat_inputs:
            if _same_file(path, in_path):
                raise ValueError(f"{flag} {path} is also {in_flag}: writing it would overwrite an input; "
                                 "give another output path")
    names = list(given.items())
    for i, (flag, path) in enumerate(names):
        for other_flag, other in names[i + 1:]:
            if _same_file(path, other):
                raise ValueError(f"{flag} and {other_flag} are the same file {path}")
