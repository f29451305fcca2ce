"""app.py's functions in-process, on a tiny untrained model: chat streaming and its stops, infill, sentiment,
the refusals of bad input, and the Gradio page's three tabs (no browser; that is test_app_browser.py)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import app  # the demo script, imported as a module (the repository root is on sys.path)
import bilingual_glm
from bilingual_glm.tokenizer import special_token_ids

from .test_finetune import make_pretrained_folder

ROOT = Path(__file__).resolve().parents[1]



def make_model_folder(path: Path, tokenizer_dir: Path, head: bool = False) -> Path:
    """A tiny untrained causal LM (or classifier) + the shared small tokenizer, saved like the scripts do."""
    if not head:
        return make_pretrained_folder(path, tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = bilingual_glm.BilingualGlmConfig.from_preset(
        "tiny", vocab_size=max(1024, len(tokenizer)), **special_token_ids(tokenizer)
    )
    torch.manual_seed(0)
    config.num_labels, config.id2label = 2, {0: "negative", 1: "positive"}
    config.label2id = {"negative": 0, "positive": 1}
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("chat-model"), tokenizer_dir)


@pytest.fixture(scope="module")
def demo(model_dir):
    return app.load_models(str(model_dir), max_prompt_tokens=64)


def test_chat_streams_growing_text_equal_to_plain_greedy_generation(demo):
    chunks = list(app.chat_stream(demo, "你好", [], max_new_tokens=12))
    assert len(chunks) >= 2
    assert all(later.startswith(earlier) for earlier, later in zip(chunks, chunks[1:], strict=False))
    inputs = demo.tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    output = demo.model.generate(**inputs, **app.generation_kwargs(demo, 12))
    expected = demo.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert chunks[-1] == expected


def test_chat_stops_at_role_tokens_not_only_at_eos(model_dir, tokenizer_dir):
    """A head that always picks <|user|> or <|observation|> (by the sign of one hidden unit) ends at once."""
    demo = app.load_models(str(model_dir), max_prompt_tokens=64)
    tokenizer = demo.tokenizer
    user, observation = tokenizer.convert_tokens_to_ids(["<|user|>", "<|observation|>"])
    assert {tokenizer.eos_token_id, user, observation} <= set(demo.stop_token_ids)
    with torch.no_grad():
        head = demo.model.get_output_embeddings().weight
        head.zero_()
        head[user, 0], head[observation, 0] = 100.0, -100.0
    assert list(app.chat_stream(demo, "Hello", [], max_new_tokens=20)) == [
        "(the model answered with an empty text)"
    ]
    inputs = app.build_chat_inputs(demo, "Hello", [])
    prompt_length = inputs["input_ids"].shape[1]
    output = demo.model.generate(**inputs, **app.generation_kwargs(demo, 5))  # what chat_stream runs
    assert output.shape[1] - prompt_length == 1 and output[0, -1].item() in (user, observation)
    eos_only = demo.model.generate(**inputs, **{**app.generation_kwargs(demo, 5), "eos_token_id": 0})
    assert eos_only.shape[1] - prompt_length == 5  # with eos alone it would write the next turns


def test_chat_history_is_trimmed_oldest_first_and_a_lone_long_message_is_refused(demo):
    history = []
    for turn in range(12):
        history += [
            {"role": "user", "content": f"question number {turn}"},
            {"role": "assistant", "content": [{"type": "text", "text": f"answer number {turn}"}]},
        ]
    prompt = demo.tokenizer.decode(app.build_chat_inputs(demo, "last one", history)["input_ids"][0])
    assert prompt.endswith("<|user|>\nlast one<|assistant|>")
    assert "answer number 11" in prompt and "question number 0" not in prompt
    assert len(demo.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= demo.max_prompt_tokens
    with pytest.raises(app.DemoInputError, match="too long: .* the limit is 64"):
        app.build_chat_inputs(demo, "word " * 200, [])
    with pytest.raises(app.DemoInputError, match="message is empty"):
        list(app.chat_stream(demo, "   ", []))
    assert "too long" in app.check_chat_message(demo, "word " * 200)
    assert "message is empty" in app.check_chat_message(demo, "")
    assert app.check_chat_message(demo, "hello") is None


def test_infill_highlights_one_span_per_mask_and_rebuilds_the_filled_text(demo):
    text = "我爱[MASK]。I love [sMASK]."
    segments, filled = app.fill_blanks(demo, text, max_new_tokens=4)
    labels = [label for _, label in segments]
    assert labels == [None, "[MASK]", None, "[sMASK]", None]
    assert [piece for piece, label in segments if label is None] == ["我爱", "。I love ", "."]
    expected = bilingual_glm.infill.infill(demo.model, demo.tokenizer, text, max_new_tokens=4)
    assert filled == expected == "".join("" if piece == "(empty)" else piece for piece, _ in segments)


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "text is empty"), ("no blank here", "has no blank"), ("长" * 80 + "[MASK]", "too long")],
)
def test_infill_refuses_bad_text_with_a_message(demo, text, message):
    with pytest.raises(app.DemoInputError, match=message):
        app.fill_blanks(demo, text)


def test_sentiment_by_cloze_gives_a_distribution_over_the_labels(demo):
    zh, en = app.classify(demo, "房间很干净。"), app.classify(demo, "The room was clean.")
    for probabilities in (zh, en):
        assert list(probabilities) == ["negative", "positive"]
        assert sum(probabilities.values()) == pytest.approx(1.0)
    assert zh != en  # different pattern and verbalizers per language (差/好 vs bad/good)
    with pytest.raises(app.DemoInputError, match="text is empty"):
        app.classify(demo, " ")
    with pytest.raises(app.DemoInputError, match="too long"):
        app.classify(demo, "很好" * 100)


def test_sentiment_with_a_classification_folder_uses_its_head(tmp_path, model_dir, tokenizer_dir):
    head_dir = make_model_folder(tmp_path / "head", tokenizer_dir, head=True)
    demo = app.load_models(str(model_dir), str(head_dir))
    probabilities = app.classify(demo, "太差了。")
    head = demo.classifier.model
    with torch.no_grad():
        expected = head(**demo.classifier.tokenizer("太差了。", return_tensors="pt")).logits[0].softmax(-1)
    assert probabilities == pytest.approx(dict(zip(["negative", "positive"], expected.tolist(), strict=True)))
    assert "classification head" in demo.classifier.source


def test_page_has_three_tabs_and_shows_bad_input_as_a_page_error(demo):
    page = app.build_demo(demo)
    tabs = [block.label for block in page.blocks.values() if isinstance(block, gr.Tab)]
    assert tabs == ["Chat", "Blank infilling", "Sentiment"]
    shown = app._shown(lambda text: app.fill_blanks(demo, text))
    with pytest.raises(gr.Error, match="has no blank") as error:
        shown("plain text")
    assert error.value.title == "Check the input"

    def respond(message):
        yield from app.chat_stream(demo, message, [])

    with pytest.raises(gr.Error, match="message is empty"):
        list(app._shown(respond)(""))


def test_missing_model_folder_exits_with_the_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert app.main(["--model", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert f"app.py: error: {tmp_path / 'nothing'}: no model folder there" in error
    assert "python finetune.py --task sft" in error and "docs/chat.md" in error


def test_recipe_sample_script_answers_exactly_as_the_chat_tab(demo):
    from scripts.experiments import chat_samples

    assert chat_samples.ROLE_TOKENS == app.ROLE_TOKENS
    streamed = list(app.chat_stream(demo, "What is AI?", [], max_new_tokens=10))[-1]
    answer = chat_samples.answer(demo.model, demo.tokenizer, "What is AI?", 10)
    assert streamed == (answer if answer.strip() else "(the model answered with an empty text)")
