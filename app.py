"""Try a bilingual_glm model in the browser: streaming chat, blank infilling, sentiment (Gradio, Space-ready).

    python app.py                                   # model from $BILINGUAL_GLM_MODEL, else runs/chat-sft
    python app.py --model runs/chat-sft --classifier runs/sentiment --port 7860

Three tabs, each a plain function below (tested in-process without a browser) behind a thin Gradio layer:

- **Chat**: the tokenizer's chat template, ``generate`` in a thread feeding a ``TextIteratorStreamer``;
  generation stops at the eos token and at any role token (``<|user|>``, ``<|observation|>``, ...), so a
  model that has not learnt to end its answer still cannot write the user's next turn. When the history
  outgrows ``--max_prompt_tokens`` the oldest turns are dropped; a single message that alone is too long
  is refused with a message.
- **Blank infilling**: ``bilingual_glm.infill`` fills every ``[MASK]`` / ``[sMASK]`` / ``[gMASK]``; the page
  shows the text with each generated span highlighted under its mask's name.
- **Sentiment**: class probabilities from ``--classifier``: a ``finetune.py --task classification`` folder
  (its ``score`` head), or a causal LM folder (for example ``finetune.py --task cloze``) scored GLM-cloze
  style with the default verbalizers (zh ``{text}总之，很[MASK]。`` 差/好, en ``{text} It was [MASK].``
  bad/good). Without ``--classifier`` the chat model is scored the cloze way, zero-shot.

Hub Spaces: the Space runs ``python app.py``; set ``BILINGUAL_GLM_MODEL`` (and ``BILINGUAL_GLM_CLASSIFIER``)
to a folder or Hub id in the Space's settings. Host and port come from ``--host``/``--port`` or Gradio's
own ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` (which Spaces sets).

Bad input (empty text, no mask in the infill text, a prompt over ``--max_prompt_tokens``) raises
``DemoInputError``; the Gradio layer shows its message in the page (``gr.Error``), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TextIteratorStreamer,
)

import bilingual_glm  # noqa: F401  (registers model_type "bilingual_glm" with the Auto classes)
from bilingual_glm.corpora.sentiment import SENTIMENT_LABELS
from bilingual_glm.data.cloze import (
    DEFAULT_CLOZE_TEMPLATES,
    DEFAULT_VERBALIZERS,
    ClozeClassifier,
    detect_language,
)
from bilingual_glm.infill import infill

MODEL_ENV = "BILINGUAL_GLM_MODEL"
CLASSIFIER_ENV = "BILINGUAL_GLM_CLASSIFIER"
DEFAULT_MODEL = "runs/chat-sft"  # what docs/chat.md's recipe writes
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
MASK_PATTERN = re.compile(r"\[(?:MASK|sMASK|gMASK)\]")  # the tokenizer matches them verbatim in raw text
MAKE_A_MODEL = f"""Make one with the recipe in docs/chat.md (about 15 minutes on 2 CPU cores):
    python train.py --preset small --max_steps 300 --output_dir runs/chat-pretrain
    python -m bilingual_glm.corpora.dialogues --output_dir runs/chat-data
    python finetune.py --task sft --model_name_or_path runs/chat-pretrain \\
        --train_file runs/chat-data/train.jsonl --validation_file runs/chat-data/validation.jsonl \\
        --output_dir {DEFAULT_MODEL} --use_cpu true --num_train_epochs 3 --learning_rate 5e-4
or point --model / ${MODEL_ENV} at any train.py or finetune.py output folder (or a Hub id)."""


class DemoInputError(ValueError):
    """Input the demo refuses, with a message meant for the page (not a bug: no traceback)."""


# ------------------------------------------------------------------------------------------ models
@dataclass
class Classifier:
    """Sentiment scorer: a sequence-classification head, or GLM cloze over a causal LM."""

    model: Any
    tokenizer: Any
    labels: list[str]
    cloze: dict[str, ClozeClassifier] = field(default_factory=dict)  # by language; empty for a head
    source: str = ""


@dataclass
class DemoModels:
    """Everything the three tabs use, loaded once at start-up."""

    model: Any
    tokenizer: Any
    classifier: Classifier
    max_prompt_tokens: int = 512
    source: str = ""
    stop_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        role_ids = [self.tokenizer.convert_tokens_to_ids(token) for token in ROLE_TOKENS]
        eos = self.tokenizer.eos_token_id
        self.stop_token_ids = sorted({eos, *role_ids} - {None, self.tokenizer.unk_token_id})


def _cloze_classifiers(model: Any, tokenizer: Any, max_length: int) -> dict[str, ClozeClassifier]:
    """The default sentiment pattern and answers of each language, on ``model``."""
    return {
        lang: ClozeClassifier(
            model,
            tokenizer,
            DEFAULT_CLOZE_TEMPLATES[lang],
            [DEFAULT_VERBALIZERS[lang][label] for label in SENTIMENT_LABELS],
            max_length=max_length,
        )
        for lang in DEFAULT_CLOZE_TEMPLATES
    }


def _from_pretrained(auto_class: Any, path: str) -> Any:
    """``auto_class.from_pretrained(path)``; a path that is neither a folder nor a loadable Hub id says how
    to make a model instead of transformers' long "not a valid model identifier" error."""
    try:
        return auto_class.from_pretrained(path)
    except OSError as error:
        if Path(path).is_dir():
            raise
        raise FileNotFoundError(
            f"{path}: no model folder there, and not a Hub model this machine can load "
            f"({str(error).splitlines()[0][:160]}).\n{MAKE_A_MODEL}"
        ) from error


def load_classifier(path: str, chat_model: Any = None, chat_tokenizer: Any = None, max_length: int = 512):
    """``--classifier``: a classification head folder, a causal LM folder (cloze), or None (the chat model)."""
    if path is None:
        return Classifier(
            chat_model,
            chat_tokenizer,
            list(SENTIMENT_LABELS),
            _cloze_classifiers(chat_model, chat_tokenizer, max_length),
            "chat model, zero-shot cloze",
        )
    tokenizer = _from_pretrained(AutoTokenizer, path)
    architectures = _from_pretrained(AutoConfig, path).architectures or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return Classifier(model, tokenizer, labels, source=f"{path} (classification head)")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return Classifier(
        model,
        tokenizer,
        list(SENTIMENT_LABELS),
        _cloze_classifiers(model, tokenizer, max_length),
        f"{path} (cloze)",
    )


def load_models(
    model_path: str, classifier_path: str | None = None, max_prompt_tokens: int = 512
) -> DemoModels:
    """Load the chat/infill model (and the classifier); a missing local folder says how to make one."""
    tokenizer = _from_pretrained(AutoTokenizer, model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    classifier = load_classifier(classifier_path, model, tokenizer, max_prompt_tokens)
    return DemoModels(model, tokenizer, classifier, max_prompt_tokens, source=model_path)


# ------------------------------------------------------------------------------------------ chat
def _text_of(content: Any) -> str:
    """A Gradio message's content as text: a string, or a list of parts (``{"type": "text", "text": ...}``)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def build_chat_inputs(demo: DemoModels, message: str, history: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The templated prompt for ``message`` after ``history``; oldest turns dropped to fit the budget."""
    message = (message or "").strip()
    if not message:
        raise DemoInputError("Type a message first: the message is empty.")
    turns = [
        {"role": turn["role"], "content": _text_of(turn["content"])}
        for turn in history
        if turn.get("role") in ("user", "assistant")
    ]
    while True:
        messages = turns + [{"role": "user", "content": message}]
        inputs = demo.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        length = inputs["input_ids"].shape[1]
        if length <= demo.max_prompt_tokens:
            return inputs
        if not turns:
            raise DemoInputError(
                f"The message is too long: {length} tokens with the chat template, the limit is "
                f"{demo.max_prompt_tokens}. Shorten it."
            )
        turns = turns[2:] if len(turns) > 1 else []  # drop the oldest user/assistant pair


def check_chat_message(demo: DemoModels, message: str) -> str | None:
    """Why ``message`` cannot be sent (empty, or too long even with no history), or None when it can.

    The page runs this as the chat box's validator, so a refused message shows under the box and the
    conversation above it is left as it was.
    """
    try:
        build_chat_inputs(demo, message, [])
    except DemoInputError as error:
        return str(error)
    return None


def generation_kwargs(demo: DemoModels, max_new_tokens: int) -> dict[str, Any]:
    """Greedy decoding that ends at eos or at any role token (an answer never runs into the next turn)."""
    return dict(
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        eos_token_id=demo.stop_token_ids,
        pad_token_id=demo.tokenizer.pad_token_id,
    )


def chat_stream(
    demo: DemoModels, message: str, history: Sequence[dict], max_new_tokens: int = 64
) -> Iterator[str]:
    """Yield the assistant's answer so far, growing as tokens arrive (``TextIteratorStreamer``)."""
    inputs = build_chat_inputs(demo, message, history).to(demo.model.device)
    streamer = TextIteratorStreamer(demo.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    kwargs = dict(**inputs, streamer=streamer, **generation_kwargs(demo, max_new_tokens))
    thread = Thread(target=demo.model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    answer = ""
    for piece in streamer:
        if piece:
            answer += piece
            yield answer
    thread.join()
    if not answer.strip():
        yield "(the model answered with an empty text)"


# ------------------------------------------------------------------------------------------ infill
def fill_blanks(
    demo: DemoModels, text: str, max_new_tokens: int = 32
) -> tuple[list[tuple[str, str | None]], str]:
    """``text`` with every mask filled: ``(segments, filled_text)``.

    ``segments`` is what ``gr.HighlightedText`` shows: plain pieces with label ``None`` and each generated
    span labelled with the mask it replaced (an empty span shows as ``(empty)``).
    """
    text = (text or "").strip()
    if not text:
        raise DemoInputError("Type a text with a blank first: the text is empty.")
    masks = MASK_PATTERN.findall(text)
    if not masks:
        raise DemoInputError(
            "The text has no blank: put [MASK], [sMASK] or [gMASK] where the model should write."
        )
    length = len(demo.tokenizer(text, add_special_tokens=False)["input_ids"])
    if length > demo.max_prompt_tokens:
        raise DemoInputError(f"The text is too long: {length} tokens, the limit is {demo.max_prompt_tokens}.")
    filled, spans = infill(
        demo.model, demo.tokenizer, text, max_new_tokens=int(max_new_tokens), return_spans=True
    )
    pieces = MASK_PATTERN.split(text)
    segments: list[tuple[str, str | None]] = []
    for index, piece in enumerate(pieces):
        if piece:
            segments.append((piece, None))
        if index < len(masks):
            segments.append((spans[index] or "(empty)", masks[index]))
    return segments, filled


# ------------------------------------------------------------------------------------------ sentiment
@torch.no_grad()
def classify(demo: DemoModels, text: str) -> dict[str, float]:
    """Probability of each sentiment label for ``text`` (the cloze path renormalises over the answers)."""
    text = (text or "").strip()
    if not text:
        raise DemoInputError("Type a text to classify first: the text is empty.")
    scorer = demo.classifier
    length = len(scorer.tokenizer(text, add_special_tokens=False)["input_ids"])
    if length > demo.max_prompt_tokens:
        raise DemoInputError(f"The text is too long: {length} tokens, the limit is {demo.max_prompt_tokens}.")
    if scorer.cloze:
        logits = scorer.cloze[detect_language([text])].log_probs([text])[0]  # [C]
    else:
        inputs = scorer.tokenizer(text, return_tensors="pt")
        logits = scorer.model(**inputs).logits[0]
    probabilities = logits.float().softmax(-1).tolist()
    return dict(zip(scorer.labels, probabilities, strict=True))


# ------------------------------------------------------------------------------------------ page
def _shown(function: Any) -> Any:
    """Wrap a tab's function so bad input and model failures become ``gr.Error`` messages in the page."""
    import functools
    import inspect

    import gradio as gr

    def message_of(error: Exception) -> gr.Error:
        if isinstance(error, DemoInputError):
            return gr.Error(str(error), title="Check the input")
        return gr.Error(f"The model failed: {type(error).__name__}: {error}", title="Error")

    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def stream(*args: Any) -> Iterator[Any]:
            try:
                yield from function(*args)
            except Exception as error:
                raise message_of(error) from None

        return stream

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        try:
            return function(*args)
        except Exception as error:
            raise message_of(error) from None

    return call


def _validation(problem: str | None) -> tuple[bool, str]:
    return problem is None, problem or ""


def build_demo(demo: DemoModels) -> Any:
    """The Gradio page: three tabs over the functions above."""
    import gradio as gr

    def respond(message: str, history: list[dict], max_new_tokens: float) -> Iterator[str]:
        yield from chat_stream(demo, message, history, int(max_new_tokens))

    def blanks(text: str, max_new_tokens: float) -> tuple[list[tuple[str, str | None]], str]:
        return fill_blanks(demo, text, int(max_new_tokens))

    def sentiment(text: str) -> dict[str, float]:
        return classify(demo, text)

    with gr.Blocks(title="bilingual_glm demo") as page:
        gr.Markdown(
            f"# bilingual_glm\nModel: `{demo.source}` · sentiment: {demo.classifier.source} · "
            f"prompts up to {demo.max_prompt_tokens} tokens"
        )
        with gr.Tab("Chat", id="chat"):
            gr.ChatInterface(
                _shown(respond),
                chatbot=gr.Chatbot(height=320, label="Chat"),
                textbox=gr.Textbox(placeholder="你好 / Hello", label="Message", elem_id="chat-input"),
                additional_inputs=[gr.Slider(8, 256, value=64, step=8, label="Max new tokens")],
                examples=[["你好"], ["What is your name?"]],
                cache_examples=False,
                validator=lambda message: gr.validate(*_validation(check_chat_message(demo, message))),
            )
        with gr.Tab("Blank infilling", id="infill"):
            infill_text = gr.Textbox(
                label="Text with blanks",
                value="新华社北京一月一日电，[MASK]发表了新年讲话。",
                elem_id="infill-input",
            )
            infill_tokens = gr.Slider(4, 128, value=32, step=4, label="Max tokens per blank")
            infill_button = gr.Button("Fill the blanks", variant="primary", elem_id="infill-button")
            highlighted = gr.HighlightedText(label="Filled (spans highlighted)", elem_id="infill-output")
            filled = gr.Textbox(label="Filled text", elem_id="infill-filled")
            infill_button.click(_shown(blanks), [infill_text, infill_tokens], [highlighted, filled])
        with gr.Tab("Sentiment", id="sentiment"):
            sentiment_text = gr.Textbox(
                label="Text", value="房间很干净，服务也很热情。", elem_id="sentiment-input"
            )
            sentiment_button = gr.Button("Classify", variant="primary", elem_id="sentiment-button")
            probabilities = gr.Label(label="Class probabilities", elem_id="sentiment-output")
            sentiment_button.click(_shown(sentiment), [sentiment_text], [probabilities])
    return page


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV, DEFAULT_MODEL),
        help=f"Chat/infill model folder or Hub id (default: ${MODEL_ENV}, else {DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--classifier",
        default=os.environ.get(CLASSIFIER_ENV),
        help=f"Sentiment folder: classification head or causal LM for cloze (default: ${CLASSIFIER_ENV}, "
        "else the chat model, zero-shot cloze).",
    )
    parser.add_argument("--max_prompt_tokens", type=int, default=512, help="Longest prompt accepted.")
    parser.add_argument("--host", default=None, help="Interface to serve on (default: Gradio's, 127.0.0.1).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: Gradio's, 7860 or next free).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        demo = load_models(args.model, args.classifier, args.max_prompt_tokens)
    except (FileNotFoundError, OSError, ValueError) as error:
        print(f"app.py: error: {error}", file=sys.stderr)
        return 2
    page = build_demo(demo)
    page.queue().launch(server_name=args.host, server_port=args.port, ssr_mode=False, footer_links=[])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    sys.exit(main())
