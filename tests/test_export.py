"""The exported folder is self-contained: it loads through remote code with the package unimportable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import perturbed_model

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "checks" / "check_remote_code.py"


TOKENIZER_TEXT = "新华社北京电 To be, or not to be [gMASK]<sop><|user|>"


def export_with_expectations(folder: Path, expected: Path) -> None:
    """A tiny model with a tokenizer, saved as train.py saves them, and what check_remote_code.py expects."""
    from bilingual_glm.corpora import load_demo_corpus
    from bilingual_glm.tokenizer import save_tokenizer, train_tokenizer

    model = perturbed_model(seed=9)
    model.save_pretrained(folder)
    texts = load_demo_corpus("train").shuffle(seed=0).select(range(200))["text"]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    save_tokenizer(tokenizer, folder)
    write_expectations(model, expected, tokenizer_ids=tokenizer(TOKENIZER_TEXT)["input_ids"])


def write_expectations(
    model: torch.nn.Module, expected: Path, tokenizer_ids: list[int] | None = None
) -> None:
    """Logits and greedy output of `model` (and the ids the folder's tokenizer gives ``TOKENIZER_TEXT``), for
    check_remote_code.py to compare against."""
    ids = torch.randint(11, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids[:1, :4], max_new_tokens=8, do_sample=False)
    payload = {"input_ids": ids, "logits": logits, "greedy": greedy}
    if tokenizer_ids is not None:
        payload.update(tokenizer_text=TOKENIZER_TEXT, tokenizer_ids=torch.tensor(tokenizer_ids))
    torch.save(payload, expected)


def check_without_package(folder: Path, expected: Path, work: Path) -> subprocess.CompletedProcess:
    """Run check_remote_code.py isolated (`-I`, no PYTHONPATH, fresh HF_HOME): only the folder's code runs."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HOME"] = str(work / "hf_home")  # fresh remote-code module cache
    result = subprocess.run(
        [sys.executable, "-I", str(CHECK), str(folder), str(expected)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_export_writes_flat_code_with_relative_import_only(tmp_path):
    export_with_expectations(tmp_path / "model", tmp_path / "expected.pt")
    modeling = (tmp_path / "model" / "modeling_bilingual_glm.py").read_text()
    assert "from .configuration_bilingual_glm import BilingualGlmConfig" in modeling
    imports = [line for line in modeling.splitlines() if line.startswith(("import ", "from "))]
    assert all(
        line.split()[1].split(".")[0]
        in {"__future__", "inspect", "os", "tempfile", "typing", "torch", "transformers", ""}
        for line in imports
    ), imports
    assert "auto_map" in (tmp_path / "model" / "config.json").read_text()


def test_exported_folder_loads_without_the_package(tmp_path):
    export_with_expectations(tmp_path / "model", tmp_path / "expected.pt")
    result = check_without_package(tmp_path / "model", tmp_path / "expected.pt", tmp_path)
    assert "greedy_equal=True" in result.stdout


@pytest.mark.slow
def test_exported_folder_loads_in_a_venv_with_only_torch_transformers_safetensors(tmp_path):
    export_with_expectations(tmp_path / "model", tmp_path / "expected.pt")
    result = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "checks" / "check_export_venv.sh"),
            str(tmp_path / "model"),
            str(tmp_path / "expected.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        # the script reads the installed transformers version from `python` on PATH: this venv's, even
        # when pytest was started as .venv/bin/python without activating the venv
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_push_to_hub_uploads_exactly_the_self_contained_folder(tmp_path, monkeypatch):
    """Intercepted at the huggingface_hub boundary: what would be uploaded loads without the package."""
    import shutil
    from types import SimpleNamespace

    import transformers.utils.hub as hub
    from huggingface_hub import ModelCard

    uploaded = tmp_path / "hub"

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **kwargs):
            for operation in operations:
                target = uploaded / operation.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(operation.path_or_fileobj, target)
            return SimpleNamespace(commit_url="offline")

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: ModelCard("---\n---\n"))
    model = perturbed_model(seed=9)
    model.push_to_hub("someone/bilingual-glm-tiny")
    names = sorted(p.name for p in uploaded.iterdir())
    assert names == [
        "README.md",
        "config.json",
        "configuration_bilingual_glm.py",
        "generation_config.json",
        "kernels_bilingual_glm.py",
        "model.safetensors",
        "modeling_bilingual_glm.py",
        "utils_bilingual_glm.py",
    ]
    write_expectations(model, tmp_path / "expected.pt")
    check_without_package(uploaded, tmp_path / "expected.pt", tmp_path)


@pytest.mark.parametrize("offload", [False, True], ids=["auto", "disk-offload"])
def test_device_map_loading_gives_the_same_logits_loss_and_tokens(tmp_path, offload):
    """``from_pretrained(device_map=...)``: accelerate's hooks, not hard-coded ``.to()``, move activations.

    With the last layer, the final norm and ``lm_head`` offloaded to disk their weights stay on ``meta``
    until accelerate's hooks load them for each forward, so this also checks that the chunked loss only
    reads ``lm_head.weight`` when nothing patched the module's forward."""
    from transformers import AutoModelForCausalLM

    model = perturbed_model(seed=3)
    model.save_pretrained(tmp_path / "model")
    last = f"model.layers.{model.config.num_hidden_layers - 1}"
    device_map: str | dict[str, str] = "auto"
    if offload:
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
        device_map |= {f"model.layers.{i}": "cpu" for i in range(model.config.num_hidden_layers - 1)}
        device_map |= {last: "disk", "model.norm": "disk"}
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    if offload:
        assert loaded.lm_head.weight.device.type == "meta"  # really offloaded, loaded per forward
        assert loaded.get_submodule(last).mlp.down_proj.weight.device.type == "meta"
    ids = torch.randint(11, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = model(ids, labels=ids), loaded(ids, labels=ids)
        greedy = model.generate(ids[:1, :4], max_new_tokens=8, do_sample=False)
        assert torch.equal(loaded.generate(ids[:1, :4], max_new_tokens=8, do_sample=False), greedy)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=0, atol=1e-6)
