"""The bilingual (Chinese/English) tokenizer: byte-level BPE with GLM special tokens and a GLM-4 chat template.

Design choices, and why:

- **Byte-level BPE, no normalizer, no UNK.** Every string is some sequence of bytes, and every byte is in
  the base vocabulary, so ``decode(encode(s)) == s`` for *any* Unicode string: rare CJK (𠀀), emoji, tabs,
  runs of spaces, ``\\r\\n``. Nothing is lower-cased, NFKC-folded or stripped.
- **CJK-aware pre-tokenizer** (a regex split, then bytes). The GPT-2/GPT-4 patterns glue Han characters to
  Latin letters and to a leading space/punctuation mark; ours isolates runs of Han characters so merges
  learn Chinese words and characters, never "，中" or "a中". Digits are split one by one (numbers stay
  compositional, as in GLM-4/LLaMA), English keeps GPT-style " word" pieces and contractions::

      "It's 1998年，中共中央 Windows95"
      → It | 's | ␣ | 1 | 9 | 9 | 8 | 年 | ， | 中共中央 | ␣Windows | 9 | 5

- **Special tokens = ``GLM_SPECIAL_TOKENS``, ids 0..10 in tuple order,** so the ids written in every
  preset config are right by construction. They are matched in raw text (a string containing
  ``<|user|>`` encodes to its single id) and decode back to exactly that text.
- **A plain ``PreTrainedTokenizerFast``** (no custom class): the saved folder loads with
  ``AutoTokenizer.from_pretrained`` anywhere, without this package or ``trust_remote_code``. Saved with
  ``save_tokenizer``: transformers 5 writes ``tokenizer_class: TokenizersBackend`` and a list of
  ``extra_special_tokens``, which transformers 4.57 cannot read (it knows neither), so the config is
  written in the form both read (``PreTrainedTokenizerFast``, ``additional_special_tokens``).
- **GLM-4 chat format**::

      [gMASK]<sop><|system|>\\n{system}<|user|>\\n{user}<|assistant|>\\n{answer}<|endoftext|><|user|>\\n...

  Unlike GLM-4 (which stops on the next role token), every assistant turn ends with ``<|endoftext|>`` =
  ``eos_token``, so plain ``generate()`` stops by itself. The newline after ``<|assistant|>``, the answer
  and that ``<|endoftext|>`` are inside ``{% generation %}``: ``add_generation_prompt`` appends just
  ``<|assistant|>``, so those are exactly the tokens the model must learn to produce
  (``return_assistant_tokens_mask=True`` marks them).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .configuration.configuration_bilingual_glm import GLM_SPECIAL_TOKENS, SPECIAL_TOKEN_FIELDS
from .io import write_json_atomic

EOS_TOKEN = SPECIAL_TOKEN_FIELDS["eos_token_id"]
PAD_TOKEN = SPECIAL_TOKEN_FIELDS["pad_token_id"]
MASK_TOKEN = SPECIAL_TOKEN_FIELDS["mask_token_id"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "observation")

# Config field → special token (the configuration's table), for writing the tokenizer's ids into a config.
CONFIG_TOKEN_FIELDS = SPECIAL_TOKEN_FIELDS

# Alternatives are tried in order at each position (all pieces keep their text: behavior="isolated").
PRE_TOKENIZER_PATTERN = "|".join(
    [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions
        r"\p{Han}+",  # a run of Han characters, never glued to a space or punctuation
        r"[^\r\n\p{L}\p{N}]?(?:(?!\p{Han})\p{L})+",  # a non-Han word, with one leading space/mark
        r"\p{N}",  # one digit (ASCII or full-width)
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # punctuation/symbols (incl. emoji), with one leading space
        r"\s*[\r\n]+",  # line breaks, with the indentation before them
        r"\s+(?!\S)",  # spaces, leaving the last one to the next word
        r"\s+",
    ]
)

# Byte-level base alphabet (256) + the specials: the smallest vocabulary that can be trained.
MIN_VOCAB_SIZE = 256 + len(GLM_SPECIAL_TOKENS)

# Jinja is rendered with trim_blocks/lstrip_blocks by transformers; every character of output is therefore
# written as an expression, so the template's own line breaks never leak into the prompt.
CHAT_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant', 'observation'] -%}\n"
    "        {{- raise_exception(\"Unknown role '\" + message['role'] + \"': expected system, user, "
    'assistant or observation") -}}\n'
    "    {%- endif -%}\n"
    "    {{- '<|' + message['role'] + '|>' -}}\n"
    "    {%- if message['role'] == 'assistant' -%}\n"
    "        {%- generation -%}\n"
    "            {{- '\\n' + message['content'] + '<|endoftext|>' -}}\n"
    "        {%- endgeneration -%}\n"
    "    {%- else -%}\n"
    "        {{- '\\n' + message['content'] -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '<|assistant|>' -}}\n"
    "{%- endif -%}\n"
)


def build_backend() -> Tokenizer:
    """An untrained ``tokenizers.Tokenizer`` with our BPE model, pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE())  # no unk_token: unnecessary with a full byte alphabet
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _special_added_tokens() -> list[AddedToken]:
    # normalized=False: matched in the raw text; no lstrip/rstrip: surrounding spaces are kept (round trip).
    return [AddedToken(token, special=True, normalized=False) for token in GLM_SPECIAL_TOKENS]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Train the bilingual byte-level BPE on ``texts`` and wrap it for transformers.

    Args:
        texts: training documents (a list, a generator, or a ``Dataset["text"]`` column).
        vocab_size: target size including the 11 special tokens and 256 byte symbols. A small corpus may
            yield fewer merges; ``len(tokenizer)`` is then smaller, never larger.
        model_max_length: stored on the tokenizer (the model's ``max_position_embeddings``).
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    backend = build_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=_special_added_tokens(),  # added first → ids 0..10 in tuple order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    for index, token in enumerate(GLM_SPECIAL_TOKENS):
        if backend.token_to_id(token) != index:
            raise RuntimeError(
                f"special token {token!r} got id {backend.token_to_id(token)}, expected {index}"
            )
    return wrap_backend(backend, model_max_length=model_max_length)


def wrap_backend(backend: Tokenizer, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Wrap a trained backend as a ``PreTrainedTokenizerFast`` with our special tokens and chat template."""
    named = {EOS_TOKEN, PAD_TOKEN, MASK_TOKEN}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=[token for token in GLM_SPECIAL_TOKENS if token not in named],
        padding_side="right",  # training; see left_padded() for batched generation
        truncation_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # would turn " ." into "." and break the round trip
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of the GLM special tokens under their model-config field names (``eos_token_id``, ...).

    Read them from the tokenizer rather than assuming 0..10, so a foreign tokenizer (e.g. a converted
    GLM-4 one) gives its own ids; raises ``ValueError`` naming the first token it lacks.
    """
    vocab = tokenizer.get_vocab()
    ids: dict[str, int] = {}
    for field, token in CONFIG_TOKEN_FIELDS.items():
        if token not in vocab:
            raise ValueError(f"{field}: tokenizer has no {token!r} token")
        ids[field] = vocab[token]
    return ids


def check_tokenizer_matches(config: Any, tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise ``ValueError`` when a tokenizer cannot drive a model: more ids than embeddings, or a GLM
    special token whose id differs from the config's (masks and stops would silently go wrong)."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"tokenizer: it has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
            "use the tokenizer the model was trained with"
        )
    vocab = tokenizer.get_vocab()
    for field_name, token in CONFIG_TOKEN_FIELDS.items():
        expected = getattr(config, field_name, None)
        if isinstance(expected, list):
            expected = expected[0] if expected else None
        if expected is not None and token in vocab and vocab[token] != expected:
            raise ValueError(
                f"tokenizer: {token!r} has id {vocab[token]} but the model config's {field_name} is {expected}; "
                "tokenizer and model do not belong together"
            )


def left_padded(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A copy of ``tokenizer`` that pads on the left, for batched ``generate()``.

    Generation appends after the last position of every row, so the padding must sit before the prompt.
    A copy, not a toggle, keeps the (right-padding) training tokenizer unchanged.
    """
    copied = copy.deepcopy(tokenizer)
    copied.padding_side = "left"
    return copied



def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """``save_pretrained``, then ``portable_tokenizer_config``: the folder's tokenizer loads with a plain
    ``AutoTokenizer.from_pretrained(folder)`` under transformers 4.57 and 5.x alike."""
    tokenizer.save_pretrained(folder)
    portable_tokenizer_config(folder)


def portable_tokenizer_config(folder: str | Path) -> None:
    """Rewrite ``folder/tokenizer_config.json`` in the form transformers 4.57 and 5.x both read.

    transformers 5 names the class ``TokenizersBackend`` (4.57: "does not exist") and stores the extra
    special tokens as a list (4.57 expects a dict there: ``AttributeError``); both versions read
    ``PreTrainedTokenizerFast`` and a list of ``additional_special_tokens``. No ``auto_map``: the tokenizer
    needs no remote code, whatever the model's ``config.json`` carries.
    """
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return  # not one of ours (a converted checkpoint may bring its own tokenizer class)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    elif extra is not None:
        config["extra_special_tokens"] = extra
    config.pop("auto_map", None)
    write_json_atomic(path, config)

__all__ = [
    "CHAT_TEMPLATE",
    "check_tokenizer_matches",
    "CONFIG_TOKEN_FIELDS",
    "PRE_TOKENIZER_PATTERN",
    "build_backend",
    "left_padded",
    "portable_tokenizer_config",
    "save_tokenizer",
    "special_token_ids",
    "train_tokenizer",
    "wrap_backend",
]
