"""Every example runs on a tiny model folder, and the accelerate configs are valid accelerate configs.

Examples are called through their ``main(argv)`` in-process (one also as a real script), on one tiny
pretrained folder and one tiny classification folder built once for the module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import bilingual_glm
from bilingual_glm.tokenizer import special_token_ids

from .conftest import load_script
from .test_finetune import make_pretrained_folder

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def example(name: str):
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_pretrained_folder(tmp_path_factory.mktemp("pretrained"), tokenizer_dir)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """An (untrained) two-label classification folder with the sentiment label names."""
    path = tmp_path_factory.mktemp("classifier")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = bilingual_glm.BilingualGlmConfig.from_preset(
        "tiny",
        vocab_size=max(1024, len(tokenizer)),
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        **special_token_ids(tokenizer),
    )
    torch.manual_seed(0)
    bilingual_glm.BilingualGlmForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_generate_continues_chinese_and_english_prompts(pretrained_dir, capsys):
    example("generate").main([str(pretrained_dir), "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert "'中国人民' -> " in out and "'To be, or not to be' -> " in out


def test_generate_runs_as_a_script(pretrained_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "generate.py"), str(pretrained_dir), "--prompt", "北京", "--sample"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "'北京' -> " in result.stdout, result.stderr[-2000:]


def test_streamed_chat_equals_plain_greedy_generation(pretrained_dir, capsys):
    chat = example("chat_stream")
    tokenizer = AutoTokenizer.from_pretrained(pretrained_dir)
    model = AutoModelForCausalLM.from_pretrained(pretrained_dir).eval()
    history = [{"role": "user", "content": "你好"}]
    streamed = chat.reply(model, tokenizer, history, max_new_tokens=6)
    inputs = tokenizer.apply_chat_template(
        history, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert streamed == tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    chat.main([str(pretrained_dir), "--message", "你好", "--message", "hi", "--max_new_tokens", "3"])
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_infill_fills_every_blank(pretrained_dir, capsys):
    example("infill").main(
        [str(pretrained_dir), "--text", "北京是[MASK]的首都，[MASK]。", "--max_new_tokens", "3"]
    )
    out = capsys.readouterr().out
    filled = out.split("filled: ")[1]
    assert "spans: [" in out and "[MASK]" not in filled and filled.startswith("'北京是")


def test_pipelines_generate_and_classify(pretrained_dir, classifier_dir, capsys):
    example("pipelines").main(
        ["--generator", str(pretrained_dir), "--classifier", str(classifier_dir), "--max_new_tokens", "3"]
    )
    out = capsys.readouterr().out
    assert out.count("text-generation: '") == 2 and "text-generation (chat): {'role': 'assistant'" in out
    assert out.count("text-classification: ") == 2 and ("-> positive (" in out or "-> negative (" in out)


def test_classify_prints_a_label_and_probabilities_per_text(classifier_dir, capsys):
    texts = ["房间很干净", "太差了", "great stay"]
    example("classify").main([str(classifier_dir), *texts, "--batch_size", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for line, text in zip(lines, texts, strict=True):
        label, scores, shown = line.split("\t")
        probabilities = [float(part.split("=")[1]) for part in scores.split(", ")]
        assert label in ("negative", "positive") and shown == text
        assert sum(probabilities) == pytest.approx(1.0, abs=2e-3)


def test_lora_finetune_writes_an_adapter_and_a_merged_model(pretrained_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    example("lora_finetune").main([str(pretrained_dir), "--output_dir", str(out), "--max_steps", "2"])
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert "merged model answers:" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(pretrained_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    changed = [
        name
        for (name, p), (_, q) in zip(merged.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert changed and all(n.endswith(("_proj.weight", "_proj.bias")) for n in changed), changed
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template


@pytest.mark.parametrize(
    ("name", "kind", "extra"),
    [
        ("ddp", "MULTI_GPU", {}),
        ("fsdp", "FSDP", {"fsdp_transformer_layer_cls_to_wrap": "BilingualGlmDecoderLayer"}),
        ("deepspeed_zero2", "DEEPSPEED", {"zero_stage": 2}),
        ("deepspeed_zero3", "DEEPSPEED", {"zero_stage": 3, "zero3_save_16bit_model": True}),
    ],
)
def test_accelerate_configs_are_valid(name, kind, extra):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(EXAMPLES / "accelerate" / f"{name}.yaml")
    assert (
        config.distributed_type.value == kind
        and config.num_processes == 8
        and config.mixed_precision == "bf16"
    )
    section = config.fsdp_config or config.deepspeed_config or {}
    assert extra.items() <= section.items()
    if name == "fsdp":  # the wrap class must be the model's unit of sharding
        assert (
            section["fsdp_transformer_layer_cls_to_wrap"]
            in bilingual_glm.BilingualGlmForCausalLM._no_split_modules
        )


def test_examples_readme_covers_every_example_and_launch_setup():
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for path in sorted(EXAMPLES.glob("*.py")) + sorted((EXAMPLES / "accelerate").glob("*.yaml")):
        assert path.name in readme, path.name
    for needle in ("1 GPU", "8 GPUs", "nodes", "train.py", "finetune.py", "torchrun", "accelerate launch"):
        assert needle in readme, needle


def test_classification_folder_loads_for_pipeline_without_padding_surprises(classifier_dir):
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    single = [
        model(**tokenizer(text, return_tensors="pt")).logits for text in ("好", "房间很干净，服务也很热情")
    ]
    batch = model(**tokenizer(["好", "房间很干净，服务也很热情"], padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(batch, torch.cat(single), atol=1e-5, rtol=1e-4)
