"""Property tests (hypothesis) for the prefix-mask builder and the GLM-4 converters, plus the
safe-formats rule: weights only ever as safetensors, every torch.load with weights_only=True."""

import re
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilingual_glm
from bilingual_glm.conversion import from_transformers_glm, to_transformers_glm
from bilingual_glm.modeling.modeling_bilingual_glm import build_attention_mask

ROOT = Path(__file__).resolve().parents[1]


@st.composite
def mask_cases(draw):
    batch = draw(st.integers(1, 3))
    q_len = draw(st.integers(1, 6))
    past = draw(st.integers(0, 5))
    spare = draw(st.integers(0, 3))  # static-cache slots beyond the written keys
    kv_len = past + q_len + spare
    prefixes = draw(st.none() | st.lists(st.integers(0, past + q_len), min_size=batch, max_size=batch))
    padding = draw(
        st.none()
        | st.lists(
            st.lists(st.booleans(), min_size=past + q_len, max_size=past + q_len),
            min_size=batch,
            max_size=batch,
        )
    )
    return batch, q_len, past, kv_len, prefixes, padding


@settings(max_examples=300, deadline=None)
@given(mask_cases())
def test_mask_builder_equals_the_rule_element_by_element(case):
    batch, q_len, past, kv_len, prefixes, padding = case
    prefix_tensor = None if prefixes is None else torch.tensor(prefixes)
    padding_tensor = None if padding is None else torch.tensor(padding, dtype=torch.long)
    mask = build_attention_mask(
        padding_tensor, prefix_tensor, batch, q_len, past, kv_len, torch.device("cpu")
    )
    assert mask.shape == (batch, 1, q_len, kv_len)
    for b in range(batch):
        for qi in range(q_len):
            i = past + qi  # absolute query position
            for j in range(kv_len):
                visible = j <= i or (prefixes is not None and j < prefixes[b])
                if padding is not None:
                    is_real = j < len(padding[b]) and padding[b][j]
                    visible = visible and (is_real or j == i)
                assert bool(mask[b, 0, qi, j]) == visible, (b, qi, j)
        assert mask[b, 0].any(dim=-1).all()  # no empty softmax row


@st.composite
def glm_configs(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 12, 16]))
    return dict(
        vocab_size=draw(st.integers(32, 96)),
        hidden_size=draw(st.sampled_from([16, 24, 32])),
        intermediate_size=draw(st.integers(8, 48)),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        partial_rotary_factor=draw(st.sampled_from([0.5, 0.25])) if head_dim % 8 == 0 else 0.5,
        rope_theta=draw(st.sampled_from([10000.0, 5e6])),
        tie_word_embeddings=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
        pad_token_id=0,
        eos_token_id=1,
        mask_token_id=2,
        smask_token_id=3,
        gmask_token_id=4,
        sop_token_id=5,
        eop_token_id=6,
    )


@settings(max_examples=40, deadline=None)
@given(glm_configs(), st.integers(0, 2**16))
def test_converters_keep_logits_on_random_configs(fields, seed):
    torch.manual_seed(seed)
    ours = bilingual_glm.BilingualGlmForCausalLM(bilingual_glm.BilingualGlmConfig(**fields)).eval()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    native = to_transformers_glm(ours)
    back = from_transformers_glm(native)
    ids = torch.randint(0, fields["vocab_size"], (2, 7))
    with torch.no_grad():
        reference = ours(ids).logits
        assert (native(ids).logits - reference).abs().max() <= 1e-5
        assert (back(ids).logits - reference).abs().max() <= 1e-5
    assert back.config.to_diff_dict() | {"architectures": None} == ours.config.to_diff_dict() | {
        "architectures": None
    }


def _python_files() -> list[Path]:
    skip = {".venv", "build", "dist", ".git"}
    files = [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]  # this file names the patterns


def test_every_torch_load_is_weights_only_and_nothing_pickles_weights():
    offenders = []
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
        if re.search(r"safe_serialization\s*=\s*False", text):
            offenders.append(f"{path.relative_to(ROOT)}: safe_serialization=False")
    assert not offenders, offenders


def test_saved_model_folders_hold_safetensors_only(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    suffixes = {p.suffix for p in tmp_path.iterdir()}
    assert ".safetensors" in suffixes and not suffixes & {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
