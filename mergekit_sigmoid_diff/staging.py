"""Write a merge beside its output folder and move it there only once it is complete.

A merge reads tens of GB and writes for minutes. If it fails, is interrupted or fills
the disk, nothing at OUT may look like a finished model (``config.json`` beside
``*.safetensors``), and no file of the user's may be touched. :func:`staged_output`:

1. refuses an OUT that exists and is not an empty folder (nothing is ever deleted or
   overwritten there);
2. creates the staging folder ``<OUT>.partial-<pid>`` next to OUT, which also proves
   that OUT's parent is writable, before any tensor is read;
3. while the caller merges into it, makes SIGTERM raise like Ctrl-C does;
4. on any failure or interrupt deletes the staging folder, and turns a full disk (or
   another write error) into one line naming OUT and the errno;
5. on success fixes the model card's title (mergekit names it after the folder it
   wrote to) and renames the staging folder to OUT, one atomic step on one filesystem.

A process killed outright (SIGKILL, power loss) can leave ``<OUT>.partial-<pid>``
behind: its name says it is incomplete, and OUT itself never exists half-written.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Iterator, Optional

from mergekit_sigmoid_diff.errors import SigmoidDiffError

STAGING_SUFFIX = ".partial-"

# errno values that mean "the output could not be written": disk or quota full, file
# size limit, read-only filesystem. safetensors reports them inside its own error type
# as "... (os error N)", hence the pattern.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM during a staged merge.

    A BaseException like KeyboardInterrupt, so that ``except Exception`` blocks in the
    merge code (mergekit has some) cannot swallow it.
    """


def staging_folder(out: Path, pid: Optional[int] = None) -> Path:
    """Where the merge for ``out`` is written until it is complete."""
    return out.with_name(f"{out.name}{STAGING_SUFFIX}{os.getpid() if pid is None else pid}")


def check_output(out_path: str | os.PathLike) -> Path:
    """The absolute output path, if it is free: absent, or an empty folder."""
    out = Path(os.path.abspath(os.path.expanduser(out_path)))
    if out.is_dir():
        if any(out.iterdir()):
            raise SigmoidDiffError(
                f"output folder {out} already exists and is not empty: choose a new path or "
                "empty it (nothing in it was changed)"
            )
    elif out.exists() or out.is_symlink():
        raise SigmoidDiffError(f"output {out} exists and is not a folder")
    return out


@contextmanager
def staged_output(out_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging folder; publish it as ``out_path`` if the body succeeds.

    See the module docstring for the guarantees. Raises :class:`SigmoidDiffError` for
    a taken or unwritable OUT and for write errors; other exceptions (and Ctrl-C) pass
    through unchanged once the staging folder is gone; SIGTERM becomes a one-line error.
    """
    out = check_output(out_path)
    stage = staging_folder(out)
    try:
        os.makedirs(out.parent, exist_ok=True)
        os.mkdir(stage)
    except OSError as error:
        raise SigmoidDiffError(
            f"cannot write the output {out}: {out.parent} is not writable ({error.strerror or error})"
        ) from None

    try:
        with _sigterm_raises():
            yield stage
    except BaseException as error:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(error, Terminated):
            raise SigmoidDiffError(
                f"merge interrupted by SIGTERM: removed the incomplete output, nothing was written to {out}"
            ) from None
        code = _write_errno(error)
        if code is None:
            raise
        raise SigmoidDiffError(
            f"writing the merged model for {out} failed: {os.strerror(code)} "
            f"(errno {code}, {errno.errorcode.get(code, '?')}); removed the incomplete output, "
            f"nothing was written to {out}"
        ) from None
    _publish(stage, out)


def _write_errno(error: BaseException) -> Optional[int]:
    """The errno of a failed write, whether raised as OSError or by safetensors."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code is None:
        match = _OS_ERROR_IN_TEXT.search(str(error))
        code = int(match.group(1)) if match else None
    return code if code in _WRITE_ERRNOS else None


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Make SIGTERM raise :class:`Terminated` for the duration (main thread only:
    Python delivers signals there, and only it may install handlers). A SIGTERM the
    caller chose to ignore (``nohup``-style) stays ignored."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    ):
        yield
        return

    def terminate(signum: int, frame: Optional[FrameType]) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _publish(stage: Path, out: Path) -> None:
    """Name OUT in the model card, then move the finished merge to OUT."""
    card = stage / "README.md"
    try:
        if card.is_file():
            text = card.read_text(encoding="utf-8")
            card.write_text(text.replace(stage.name, out.name), encoding="utf-8")
        os.rename(stage, out)  # replaces OUT only if it is (still) an empty folder
    except OSError as error:
        raise SigmoidDiffError(
            f"the merge finished but could not be moved to {out} ({error.strerror or error}); "
            f"it is complete in {stage}"
        ) from None
