"""Bilingual byte-level BPE: exact round trip, fixed special-token ids, chat template, portable save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer

from bilingual_glm.configuration.configuration_bilingual_glm import GLM_SPECIAL_TOKENS, PRESETS
from bilingual_glm.corpora import load_demo_corpus
from bilingual_glm.tokenizer import (
    CONFIG_TOKEN_FIELDS,
    PRE_TOKENIZER_PATTERN,
    left_padded,
    special_token_ids,
    train_tokenizer,
)

VOCAB_SIZE = 1024  # the `tiny` preset


@pytest.fixture(scope="module")
def tokenizer():
    zh = load_demo_corpus("train", languages=("zh",))["text"][:300]
    en = load_demo_corpus("train", languages=("en",))["text"][:60]
    return train_tokenizer(list(zh) + list(en), vocab_size=VOCAB_SIZE, model_max_length=512)


def round_trip(tokenizer, text: str) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------------------------------
# Round trip

HOSTILE = [
    "",
    " ",
    "𠀀𠀁𪚥",  # CJK extension B (outside the BMP), never seen in training
    "😀👩‍👩‍👧‍👦🇨🇳",  # emoji, ZWJ sequence, flag
    "\t\tindented\ttabs\t",
    "runs     of  spaces   ",
    "\n\n\nnewlines\r\n\rCR\n",
    "\x00\x01\x7f\u200b\ufeff\ufffd",
    "ＡＢＣ１２３，。！",  # full-width forms must not be NFKC-folded
    "e\u0301 vs é",  # combining accent must not be composed
    "中文English混合 mixed，标点!?",
    "<|user|>hi<|assistant|>",
    "text<|endoftext|>more[MASK][sMASK][gMASK]<sop><eop><pad>",
    " <|system|> spaced ",
    "<|user|<|user|>>",  # special text touching lookalike text
    "<|unknown|> [mask] <SOP>",  # lookalikes of special tokens are plain text
]


@pytest.mark.parametrize("text", HOSTILE)
def test_round_trip_hostile_strings(tokenizer, text):
    assert round_trip(tokenizer, text) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tokenizer, text):
    assert round_trip(tokenizer, text) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=8), st.sampled_from(GLM_SPECIAL_TOKENS))).map("".join))
def test_round_trip_text_mixed_with_special_tokens(tokenizer, text):
    assert round_trip(tokenizer, text) == text


def test_no_unknown_token_and_full_vocab_at_tiny_size(tokenizer):
    assert tokenizer.unk_token is None
    assert len(tokenizer) == VOCAB_SIZE


# ----------------------------------------------------------------------------------------------------
# Pre-tokenization


def test_pre_tokenizer_isolates_han_runs_and_single_digits():
    split = pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated")
    pieces = [piece for piece, _ in split.pre_tokenize_str("It's 1998年，中共中央 Windows95 ok.")]
    assert pieces == [
        "It",
        "'s",
        " ",
        "1",
        "9",
        "9",
        "8",
        "年",
        "，",
        "中共中央",
        " Windows",
        "9",
        "5",
        " ok",
        ".",
    ]


def test_digits_are_single_tokens(tokenizer):
    assert len(tokenizer.encode("20241231", add_special_tokens=False)) == 8


@pytest.mark.parametrize("word", ["中国", "发展", "的", " the", " and"])
def test_frequent_words_become_single_tokens_even_at_tiny_vocab(tokenizer, word):
    assert len(tokenizer.encode(word, add_special_tokens=False)) == 1


# ----------------------------------------------------------------------------------------------------
# Special tokens


@pytest.mark.parametrize(("index", "token"), list(enumerate(GLM_SPECIAL_TOKENS)))
def test_special_tokens_have_fixed_ids_and_encode_from_text(tokenizer, index, token):
    assert tokenizer.convert_tokens_to_ids(token) == index
    assert tokenizer.encode(token, add_special_tokens=False) == [index]
    ids = tokenizer.encode(f"前{token}after", add_special_tokens=False)
    assert ids.count(index) == 1
    assert tokenizer.decode([index], skip_special_tokens=False) == token


def test_named_special_tokens_and_padding_side(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 10
    assert tokenizer.mask_token == "[MASK]" and tokenizer.mask_token_id == 1
    assert set(tokenizer.all_special_tokens) == set(GLM_SPECIAL_TOKENS)
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 512
    assert tokenizer("abc").keys() == {"input_ids", "attention_mask"}  # no BOS, no token_type_ids
    assert tokenizer("abc")["input_ids"] == tokenizer.encode("abc", add_special_tokens=False)


def test_skip_special_tokens_drops_role_tokens(tokenizer):
    ids = tokenizer.encode("<|assistant|>\nhi<|endoftext|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\nhi"


def test_special_token_ids_match_the_preset_configs(tokenizer):
    ids = special_token_ids(tokenizer)
    assert set(ids) == set(CONFIG_TOKEN_FIELDS)
    for field, value in ids.items():
        assert PRESETS["tiny"][field] == value, field


def test_vocab_size_below_the_byte_alphabet_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=200)


def test_left_padded_copy_pads_left_and_leaves_original(tokenizer):
    generation = left_padded(tokenizer)
    batch = generation(["a", "a longer prompt"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1
    assert tokenizer.padding_side == "right"
    assert tokenizer(["a", "a longer prompt"], padding=True)["attention_mask"][0][0] == 1


# ----------------------------------------------------------------------------------------------------
# Chat template

CONVERSATION = [
    {"role": "system", "content": "你是一个助手。"},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! 你好"},
    {"role": "observation", "content": '{"temp": 21}'},
    {"role": "assistant", "content": " It is 21°C."},
]


def test_chat_template_renders_glm4_format(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == (
        "[gMASK]<sop><|system|>\n你是一个助手。<|user|>\nHi there<|assistant|>\nHello! 你好<|endoftext|>"
        '<|observation|>\n{"temp": 21}<|assistant|>\n It is 21°C.<|endoftext|>'
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "[gMASK]<sop><|system|>\n你是一个助手。<|user|>\nHi there<|assistant|>"


def test_chat_template_ids_start_with_gmask_sop_and_use_role_ids(tokenizer):
    ids = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_dict=False)
    assert ids[:3] == [3, 4, 6]  # [gMASK] <sop> <|system|>
    assert ids[-1] == 8 and 7 in ids  # <|assistant|>, <|user|>


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(Exception, match="Unknown role 'tool'"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    out = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    spans, current = [], []
    for token_id, flag in zip(ids, mask, strict=True):
        if flag:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    decoded = [tokenizer.decode(span, skip_special_tokens=False) for span in spans]
    assert decoded == ["\nHello! 你好<|endoftext|>", "\n It is 21°C.<|endoftext|>"]
    # The unmasked tokens are exactly everything else, in order.
    rest = tokenizer.decode([t for t, f in zip(ids, mask, strict=True) if not f], skip_special_tokens=False)
    assert (
        rest
        == '[gMASK]<sop><|system|>\n你是一个助手。<|user|>\nHi there<|assistant|><|observation|>\n{"temp": 21}<|assistant|>'
    )


# ----------------------------------------------------------------------------------------------------
# Save / load without this package

PROBES = ["中文 English 混合", "<|user|>\n你好<|assistant|>", "𠀀 😀\t\t  x\n\n"]

_FOREIGN_LOADER = """
import json, sys
sys.modules["bilingual_glm"] = None  # any import of our package now fails
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({
    "class": type(tok).__name__,
    "ids": [tok.encode(p, add_special_tokens=False) for p in json.loads(sys.argv[2])],
    "chat": tok.apply_chat_template(json.loads(sys.argv[3]), add_generation_prompt=True, return_dict=False),
    "special": [tok.eos_token, tok.pad_token, tok.mask_token, tok.padding_side, tok.model_max_length],
}))
"""


def run_without_package(code: str, cwd: Path, folder: Path, *payloads: object) -> dict:
    """``code`` in an isolated interpreter (``-I``, no PYTHONPATH, stdin closed) with the folder and JSON
    payloads as arguments; its last stdout line, parsed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-I", "-c", code, str(folder), *(json.dumps(payload) for payload in payloads)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_saved_folder_loads_in_fresh_process_without_package(tokenizer, tmp_path):
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(str(folder))
    messages = CONVERSATION[:2]
    loaded = run_without_package(_FOREIGN_LOADER, tmp_path, folder, PROBES, messages)
    assert loaded["ids"] == [tokenizer.encode(p, add_special_tokens=False) for p in PROBES]
    assert loaded["chat"] == tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )
    assert loaded["special"] == ["<|endoftext|>", "<pad>", "[MASK]", "right", 512]


_MODEL_FOLDER_LOADER = """
import builtins, json, sys
sys.modules["bilingual_glm"] = None  # any import of our package now fails
asked = []
def closed_stdin(prompt=""):  # count any "run the custom code? [y/N]" question; answer as a closed stdin
    asked.append(prompt)
    raise EOFError
builtins.input = closed_stdin
import transformers
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])  # no trust_remote_code
ids = [tok.encode(p, add_special_tokens=False) for p in json.loads(sys.argv[2])]
print(json.dumps({"ids": ids, "asked": len(asked), "major": int(transformers.__version__.split(".")[0])}))
"""


def test_a_saved_model_folder_gives_its_tokenizer_without_remote_code(tokenizer, tmp_path):
    """A model folder (config with auto_map, remote code files) + save_tokenizer: a process that never
    imported bilingual_glm gets the tokenizer from ``AutoTokenizer.from_pretrained(folder)``. Its config
    needs no remote code (no auto_map; a class every transformers has); transformers 4.x then asks nothing,
    5.x asks once about the *model's* config (its AutoTokenizer loads AutoConfig first) and loads the
    same tokenizer whatever the answer."""
    from bilingual_glm import BilingualGlmConfig, BilingualGlmForCausalLM
    from bilingual_glm.tokenizer import save_tokenizer

    folder = tmp_path / "model"
    BilingualGlmForCausalLM(BilingualGlmConfig.from_preset("tiny")).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in saved
    assert "AutoConfig" in json.loads((folder / "config.json").read_text())["auto_map"]  # the model keeps it
    loaded = run_without_package(_MODEL_FOLDER_LOADER, tmp_path, folder, PROBES)
    assert loaded["ids"] == [tokenizer.encode(p, add_special_tokens=False) for p in PROBES]
    assert loaded["asked"] == 0 if loaded["major"] < 5 else loaded["asked"] <= 1


def test_reload_in_process_keeps_template_and_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.chat_template == tokenizer.chat_template
    assert special_token_ids(reloaded) == special_token_ids(tokenizer)
    assert round_trip(reloaded, HOSTILE[3] + HOSTILE[11]) == HOSTILE[3] + HOSTILE[11]
