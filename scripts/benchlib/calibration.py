"""Statistics files for the data-aware transfer (issue 26) on every suite case and seed.

The calibration texts are each model's own training data, disjoint from everything scored:

- T (every Shakespeare target): the five training plays (:data:`benchlib.chatdata.TRAIN_PLAYS`;
  the scored windows come from two other plays);
- T of ``lora-all-domain``: the training part of CPython's documentation
  (:func:`benchlib.alllayers.calibration_files`; the scored windows are the held-out topics);
- I of the chat cases: the donor's ``Quiz:`` training chats (training questions; the scored
  questions are held out), rendered with the model's chat template by ``calibrate``;
- I of ``full-domain``: the training part of CPython's documentation.

``calibrate`` runs in this process (``mergekit_sigmoid_diff.calibrate.calibrate``, the code the
command runs) with its defaults except the number of sequences. A file is reused while its name
(the model's stamp, the text's hash and the sequence count) matches and today's ``calibrate`` would
write the same numbers (:func:`current`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from benchlib import alllayers, chatdata, real

from mergekit_sigmoid_diff import mainjob, statistics

REPLY_TOKENS = 32  # B's greedy replies in the donors' training data (train_adapters and FULL_SETTINGS)


def texts(case: str, workdir: Path, base: Path, tokenizer) -> dict[str, tuple[Path, str]]:
    """{"target": (file, kind), "donor": (file, kind)}: kind is ``texts`` or ``chats``."""
    folder = Path(workdir) / "calibration-texts"
    folder.mkdir(parents=True, exist_ok=True)
    if case == alllayers.CASE:
        files = alllayers.calibration_files(folder / case, tokenizer)
        return {"target": (files["target"], "texts"), "donor": (files["donor"], "chats")}
    plays = mainjob.write_plays(chatdata.TRAIN_PLAYS, folder / "shakespeare-train.txt")
    if case == "full-domain":
        pydoc = folder / "pydoc-train.txt"
        if not pydoc.is_file():
            pydoc.write_text(alllayers.pydoc_texts()[0] + "\n", encoding="utf-8")
        return {"target": (plays, "texts"), "donor": (pydoc, "texts")}
    chats = folder / "quiz-train.jsonl"
    if not chats.is_file():
        train_q = chatdata.questions()[0]
        replies = real.base_replies(base, tokenizer, train_q, REPLY_TOKENS, workdir)
        chats.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in alllayers.donor_chats(train_q, replies)),
                         encoding="utf-8")
    return {"target": (plays, "texts"), "donor": (chats, "chats")}


def statistics_files(case: str, models: dict[str, Path], workdir: Path, base: Path, tokenizer,
                     sequences: int = 128, log=print) -> dict[str, Path]:
    """{"target": file, "donor": file}: the statistics of T on its text and of I on its data."""
    from mergekit_sigmoid_diff.calibrate import CalibrationSettings, calibrate

    out: dict[str, Path] = {}
    for role, (text, kind) in texts(case, workdir, base, tokenizer).items():
        folder = models[role]
        digest = hashlib.sha256(text.read_bytes()).hexdigest()[:12]
        path = Path(workdir) / "statistics" / f"{statistics.model_stamp(folder)[:16]}-{digest}-{sequences}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)

        def make(into: Path, folder: Path = folder, text: Path = text, kind: str = kind, role: str = role) -> None:
            log(f"calibrate {role} {folder} on {text.name} ({sequences} sequences) into {into.name}")
            arguments: dict[str, Any] = {kind: text}
            calibrate(str(folder), into, settings=CalibrationSettings(max_sequences=sequences), progress=False,
                      tokenizer=str(base), **arguments)  # the suite's model folders hold no tokenizer: B's

        current(path, make, log)
        out[role] = path
    return out


def current(path: Path, make: Callable[[Path], None], log: Callable[[str], None] = print) -> None:
    """Leave at ``path`` the file today's ``calibrate`` writes, made by ``make(path)`` if absent.

    A file whose ``code`` is not today's calibrate's is made again beside it. Bit for bit the same
    (tensors and metadata but ``code``): the old file stays, so the data rows keyed by its size and
    time stay valid, and a marker beside it records the check. Otherwise the new file replaces it
    and those rows are scored again."""
    from mergekit_sigmoid_diff.calibrate import code_version

    if not path.is_file():
        make(path)
        return
    today = code_version()
    written = statistics.StatisticsFile(path).metadata.get("code")
    checked = path.with_name(f"{path.name}.same-under-{today}")
    if written == today or checked.is_file():
        return
    again = path.with_name(f"{path.stem}.again.safetensors")
    make(again)
    if same_statistics(path, again):
        checked.write_text(f"{path.name} (calibrate {written}) is bit for bit what calibrate {today} writes\n")
        again.unlink()
        log(f"{path.name}: calibrate {today} writes the same numbers as {written}: kept")
    else:
        again.replace(path)
        log(f"{path.name}: calibrate {today} writes other numbers than {written}: replaced (its data rows are rescored)")


def same_statistics(a: Path, b: Path) -> bool:
    """Two statistics files with the same tensors, bit for bit, and the same metadata but ``code``."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        meta_a, meta_b = ({k: v for k, v in (f.metadata() or {}).items() if k != "code"} for f in (fa, fb))
        if meta_a != meta_b or set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
