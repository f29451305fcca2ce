"""THUDM-format (ChatGLM2/3, GLM-4) conversion: logit parity, layouts, special tokens, refusals, atomicity.

Checkpoints are built from a perturbed native ``GlmForCausalLM`` by the inverse mapping (fuse q/k/v into
``query_key_value``, rename), so every parity test compares against transformers' own GLM-4 code; one test
also compares against an independent re-implementation of THUDM's forward on the THUDM tensors.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig, GlmConfig, GlmForCausalLM

from bilingual_glm import io as package_io
from bilingual_glm.chatglm import config_from_chatglm, convert_chatglm_checkpoint, resolve_special_tokens
from bilingual_glm.conversion import main

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
VOCAB = 300


# ------------------------------------------------------------------------------------------ helpers
def native_glm(seed=0, heads=4, kv_heads=2, rope_ratio=1.0, tied=False, bias=True, dtype=torch.float32):
    """Tiny perturbed native GLM-4 model: the reference the converted checkpoint must match."""
    config = GlmConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * rope_ratio,
            "partial_rotary_factor": 0.5,
        },
        attention_bias=bias,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=[1, 2],
    )
    torch.manual_seed(seed)
    model = GlmForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.to(dtype).eval()


def fuse_qkv(q, k, v, heads, multi_query_attention=True):
    """THUDM's ``query_key_value`` rows from q/k/v, laid out the way THUDM's forward reads them.

    THUDM ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B ``modeling_chatglm.py``, ``SelfAttention``:
    - ``multi_query_attention`` true: ``__init__`` sizes the projection ``projection_size + 2 * hn * groups``
      and ``forward`` does ``mixed_x_layer.split([np * hn, ng * hn, ng * hn], dim=-1)``, then views each
      part per head: rows ``[Q_all | K_all | V_all]``.
    - false: ``__init__`` sizes it ``3 * projection_size`` and ``forward`` views the output as
      ``[sq, b, np, 3 * hn]`` and calls ``split_tensor_along_last_dim(mixed_x_layer, 3)``: each head owns
      one ``3 * hn`` block, rows ``[q0 k0 v0 | q1 k1 v1 | ...]`` (``multi_query_group_num`` is unused).
    """
    if multi_query_attention:
        return torch.cat((q, k, v))
    per_head = [t.unflatten(0, (heads, -1)) for t in (q, k, v)]  # each [H, hd, ...]
    return torch.cat(per_head, dim=1).flatten(0, 1)  # [H, 3*hd, ...] -> [3*H*hd, ...]


def thudm_state_dict(model, multi_query_attention=True):
    """The inverse mapping: native GLM names → THUDM names, q/k/v fused as THUDM lays them out."""
    sd, config = model.state_dict(), model.config
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"]}
    for i in range(config.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        attn = ours + "self_attn."
        out[theirs + "input_layernorm.weight"] = sd[ours + "input_layernorm.weight"]
        for kind in ("weight", "bias") if config.attention_bias else ("weight",):
            q, k, v = (sd[f"{attn}{p}_proj.{kind}"] for p in "qkv")
            out[f"{theirs}self_attention.query_key_value.{kind}"] = fuse_qkv(
                q, k, v, config.num_attention_heads, multi_query_attention
            )
        out[theirs + "self_attention.dense.weight"] = sd[attn + "o_proj.weight"]
        out[theirs + "post_attention_layernorm.weight"] = sd[ours + "post_attention_layernorm.weight"]
        out[theirs + "mlp.dense_h_to_4h.weight"] = sd[ours + "mlp.gate_up_proj.weight"]
        out[theirs + "mlp.dense_4h_to_h.weight"] = sd[ours + "mlp.down_proj.weight"]
    out["transformer.encoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if not config.tie_word_embeddings:
        out["transformer.output_layer.weight"] = sd["lm_head.weight"]
    out["transformer.rotary_pos_emb.inv_freq"] = torch.ones(4)  # a buffer THUDM saves; must be dropped
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


def thudm_config(model, rope_ratio=1.0, **overrides):
    config = model.config
    return {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": config.attention_bias,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "ffn_hidden_size": config.intermediate_size,
        "hidden_size": config.hidden_size,
        "kv_channels": config.head_dim,
        "layernorm_epsilon": config.rms_norm_eps,
        "multi_query_attention": True,
        "multi_query_group_num": config.num_key_value_heads,
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers,
        "original_rope": True,
        "padded_vocab_size": config.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": rope_ratio,
        "seq_length": 256,
        "tie_word_embeddings": config.tie_word_embeddings,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "quantization_bit": 0,
        "pre_seq_len": None,
        "prefix_projection": False,
        **overrides,
    }


def write_checkpoint(folder, state, config, fmt="safetensors", shards=1):
    """A THUDM folder: config.json plus one file or ``shards`` files with an HF index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    keys = list(state)
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    names = (
        [f"{stem}.{ext}"]
        if shards == 1
        else [f"{stem}-{k:05d}-of-{shards:05d}.{ext}" for k in range(1, shards + 1)]
    )
    weight_map = {}
    for shard, name in enumerate(names):
        part = {key: state[key] for key in keys[shard::shards]}
        weight_map.update(dict.fromkeys(part, name))
        save_file(part, str(folder / name)) if fmt == "safetensors" else torch.save(part, folder / name)
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return folder


def make_checkpoint(folder, model, rope_ratio=1.0, config_overrides=None, **write_kwargs):
    config = thudm_config(model, rope_ratio, **(config_overrides or {}))
    state = thudm_state_dict(model, config["multi_query_attention"])
    return write_checkpoint(folder, state, config, **write_kwargs)


def converted_logits(dst, ids):
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    with torch.no_grad():
        return model, model(ids).logits


def ids_for(seed=1, batch=2, length=13):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_parity(native, dst, tolerance=TOLERANCE):
    ids = ids_for()
    model, logits = converted_logits(dst, ids)
    with torch.no_grad():
        delta = (logits.float() - native(ids).logits.float()).abs().max().item()
    assert delta <= tolerance, delta
    return model


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize(
    "variant",
    [
        dict(),  # GQA 4 heads / 2 groups, qkv bias, untied
        dict(rope_ratio=500.0),  # GLM-4-9B's rope_ratio: theta 5e6
        dict(heads=4, kv_heads=1),  # MQA
        dict(tied=True),  # no output_layer in the checkpoint
        dict(bias=False),  # add_qkv_bias=False
    ],
)
def test_safetensors_checkpoint_matches_native(tmp_path, variant):
    rope_ratio = variant.get("rope_ratio", 1.0)
    native = native_glm(seed=3, **variant)
    src = make_checkpoint(tmp_path / "src", native, rope_ratio)
    assert main(["from-chatglm", str(src), str(tmp_path / "dst")]) == 0
    model = assert_parity(native, tmp_path / "dst")
    assert model.config.rope_theta == 10000.0 * rope_ratio
    assert model.config.partial_rotary_factor == 0.5
    assert model.config.tie_word_embeddings == variant.get("tied", False)
    assert model.config.num_key_value_heads == variant.get("kv_heads", 2)


def test_without_multi_query_attention_every_head_has_its_own_kv(tmp_path):
    """MQA off: per-head ``[q k v]`` blocks (see fuse_qkv); THUDM then ignores multi_query_group_num."""
    native = native_glm(seed=4, heads=4, kv_heads=4)
    overrides = {"multi_query_attention": False, "multi_query_group_num": 1}
    src = make_checkpoint(tmp_path / "src", native, config_overrides=overrides)
    convert_chatglm_checkpoint(src, tmp_path / "dst")
    assert assert_parity(native, tmp_path / "dst").config.num_key_value_heads == 4


def test_sharded_safetensors_in_and_out(tmp_path):
    native = native_glm(seed=5)
    src = make_checkpoint(tmp_path / "src", native, shards=3)
    main(["from-chatglm", str(src), str(tmp_path / "dst"), "--max-shard-size", "40KB"])
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in native.parameters())
    assert not list((tmp_path / "dst").glob("*.tmp"))
    assert_parity(native, tmp_path / "dst")


@pytest.mark.parametrize("shards", [1, 2])
def test_pytorch_bin_checkpoint(tmp_path, shards):
    native = native_glm(seed=6)
    src = make_checkpoint(tmp_path / "src", native, fmt="bin", shards=shards)
    assert (src / ("pytorch_model.bin" if shards == 1 else "pytorch_model.bin.index.json")).is_file()
    convert_chatglm_checkpoint(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "model.safetensors").is_file()
    assert_parity(native, tmp_path / "dst")


def test_bf16_source_is_kept_bit_for_bit(tmp_path):
    native = native_glm(seed=7, dtype=torch.bfloat16)
    state = thudm_state_dict(native)
    src = write_checkpoint(tmp_path / "src", state, thudm_config(native, torch_dtype="bfloat16"))
    config = convert_chatglm_checkpoint(src, tmp_path / "dst")
    assert config.dtype == torch.bfloat16
    with safe_open(str(tmp_path / "dst" / "model.safetensors"), framework="pt") as out:
        written = {key: out.get_tensor(key) for key in out.keys()}
    assert all(tensor.dtype == torch.bfloat16 for tensor in written.values())
    for i in range(2):
        fused = state[f"transformer.encoder.layers.{i}.self_attention.query_key_value.weight"]
        parts = [written[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"]
        assert torch.equal(torch.cat(parts), fused)
        gate_up = written[f"model.layers.{i}.mlp.gate_up_proj.weight"]
        assert torch.equal(gate_up, state[f"transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight"])
    assert torch.equal(written["lm_head.weight"], state["transformer.output_layer.weight"])
    model = assert_parity(native, tmp_path / "dst", tolerance=0.05)
    assert model.dtype == torch.bfloat16


def test_dtype_option_casts(tmp_path):
    native = native_glm(seed=8)
    src = make_checkpoint(tmp_path / "src", native)
    main(["from-chatglm", str(src), str(tmp_path / "dst"), "--dtype", "bfloat16"])
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert model.dtype == torch.bfloat16


def thudm_reference_logits(state, config, ids):
    """THUDM's ChatGLM2/GLM-4 forward re-implemented from its definition, on the THUDM tensors."""
    heads, hd = config["num_attention_heads"], config["kv_channels"]
    multi_query = config["multi_query_attention"]
    groups = config["multi_query_group_num"] if multi_query else heads
    eps, rot = config["layernorm_epsilon"], hd // 2  # rotary on the first half of each head

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    theta = 1.0 / ((10000 * config["rope_ratio"]) ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.outer(torch.arange(ids.shape[1]).float(), theta)[None, :, None]  # [1, T, 1, rot/2]
    cos, sin = angles.cos(), angles.sin()

    def rope(x):  # [B, T, n, hd]: adjacent pairs (x[2i], x[2i+1]) of the first half rotate
        pairs = x[..., :rot].unflatten(-1, (rot // 2, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), -1).flatten(-2)
        return torch.cat((rotated, x[..., rot:]), -1)

    x = state["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(config["num_layers"]):
        layer = f"transformer.encoder.layers.{i}."
        qkv = F.linear(
            rms(x, state[layer + "input_layernorm.weight"]),
            state[layer + "self_attention.query_key_value.weight"],
            state.get(layer + "self_attention.query_key_value.bias"),
        )
        if multi_query:  # split [Q_all | K_all | V_all], then view each part per head
            q, k, v = qkv.split([heads * hd, groups * hd, groups * hd], dim=-1)
            q, k, v = (
                q.unflatten(-1, (heads, hd)),
                k.unflatten(-1, (groups, hd)),
                v.unflatten(-1, (groups, hd)),
            )
        else:  # view per head as [..., heads, 3 * hd], then split the last dim in three
            q, k, v = qkv.unflatten(-1, (heads, 3 * hd)).split(hd, dim=-1)
        q, k = rope(q), rope(k)
        k, v = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))  # head h reads group h // (H/KV)
        attn = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        x = x + F.linear(attn.transpose(1, 2).flatten(-2), state[layer + "self_attention.dense.weight"])
        x0, x1 = F.linear(
            rms(x, state[layer + "post_attention_layernorm.weight"]),
            state[layer + "mlp.dense_h_to_4h.weight"],
        ).chunk(2, -1)
        x = x + F.linear(F.silu(x0) * x1, state[layer + "mlp.dense_4h_to_h.weight"])  # SwiGLU: x0 is the gate
    return F.linear(
        rms(x, state["transformer.encoder.final_layernorm.weight"]), state["transformer.output_layer.weight"]
    )


@pytest.mark.parametrize("multi_query_attention", [True, False])
def test_matches_an_independent_thudm_forward(tmp_path, multi_query_attention):
    """Anchors the layouts (qkv rows, gate first, interleaved half rotary, rope_ratio) to THUDM's definition."""
    native = native_glm(seed=9, heads=4, kv_heads=2 if multi_query_attention else 4)
    overrides = {} if multi_query_attention else {"multi_query_attention": False, "multi_query_group_num": 2}
    config = thudm_config(native, rope_ratio=50.0, **overrides)
    state = thudm_state_dict(native, multi_query_attention)
    convert_chatglm_checkpoint(write_checkpoint(tmp_path / "src", state, config), tmp_path / "dst")
    ids = ids_for(seed=2)
    _, logits = converted_logits(tmp_path / "dst", ids)
    with torch.no_grad():
        assert (logits - thudm_reference_logits(state, config, ids)).abs().max().item() <= TOLERANCE


def test_tied_flag_with_equal_output_layer_ties(tmp_path):
    native = native_glm(seed=10, tied=True)
    state = thudm_state_dict(native)
    state["transformer.output_layer.weight"] = state["transformer.embedding.word_embeddings.weight"].clone()
    config = convert_chatglm_checkpoint(
        write_checkpoint(tmp_path / "src", state, thudm_config(native)), tmp_path / "dst"
    )
    assert config.tie_word_embeddings
    assert_parity(native, tmp_path / "dst")


# ----------------------------------------------------------------------------------- special tokens
GLM4_NAMES = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
              "<|assistant|>", "<|observation|>"]  # fmt: skip


def test_added_tokens_decoder_sets_glm_ids_and_chat_eos(tmp_path):
    native = native_glm(seed=11)
    src = make_checkpoint(
        tmp_path / "src", native, config_overrides={"eos_token_id": 290, "pad_token_id": 290}
    )
    decoder = {str(290 + k): {"content": name, "special": True} for k, name in enumerate(GLM4_NAMES)}
    (src / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    (src / "tokenization_chatglm.py").write_text("# THUDM tokenizer code\n")
    (src / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "top_p": 0.8, "eos_token_id": 1})
    )
    config = convert_chatglm_checkpoint(src, tmp_path / "dst")
    assert (config.mask_token_id, config.gmask_token_id, config.smask_token_id) == (291, 292, 293)
    assert (config.sop_token_id, config.eop_token_id, config.pad_token_id) == (294, 295, 290)
    assert config.eos_token_id == [290, 297, 299]  # <|endoftext|>, <|user|>, <|observation|>
    generation = GenerationConfig.from_pretrained(tmp_path / "dst")
    assert generation.eos_token_id == [290, 297, 299] and generation.top_p == 0.8
    for name in ("tokenizer_config.json", "tokenization_chatglm.py"):
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
    assert convert_chatglm_checkpoint(src, tmp_path / "base", chat=False).eos_token_id == 290


def test_family_defaults_for_glm4_and_chatglm3_configs(tmp_path):
    glm4 = {"padded_vocab_size": 151552, "hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128,
            "num_layers": 40, "num_attention_heads": 32, "multi_query_attention": True,
            "multi_query_group_num": 2, "seq_length": 131072, "rope_ratio": 500, "add_qkv_bias": True,
            "layernorm_epsilon": 1.5625e-07, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329}  # fmt: skip
    config = config_from_chatglm(glm4, resolve_special_tokens(tmp_path, glm4))
    assert config.rope_theta == 5_000_000.0 and config.num_key_value_heads == 2 and config.head_dim == 128
    assert config.eos_token_id == [151329, 151336, 151338]
    assert (config.gmask_token_id, config.sop_token_id, config.eop_token_id) == (151331, 151333, 151334)

    chatglm3 = {
        **glm4,
        "padded_vocab_size": 65024,
        "num_layers": 28,
        "rope_ratio": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config = config_from_chatglm(chatglm3, resolve_special_tokens(tmp_path, chatglm3))
    assert config.rope_theta == 10000.0 and config.eos_token_id == [2, 64795, 64797]
    assert (config.mask_token_id, config.gmask_token_id, config.sop_token_id) == (64789, 64790, 64792)
    assert resolve_special_tokens(tmp_path, {**glm4, "padded_vocab_size": 1000}) == {}


def test_sentencepiece_vocab_places_chatglm3_specials_after_the_pieces(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    text = ["hello world, a tiny corpus", "glm bilingual model"] * 10
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=30, model_type="char", minloglevel=2
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()
    tokens = resolve_special_tokens(tmp_path, {"padded_vocab_size": 64})
    assert (
        tokens["[gMASK]"] == pieces + 1 and tokens["sop"] == pieces + 3 and tokens["<|user|>"] == pieces + 6
    )


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"position_encoding_2d": True}, "ChatGLM-6B v1"),
        ({"inner_hidden_size": 256}, "ChatGLM-6B v1"),
        ({"pre_seq_len": 16, "prefix_projection": False}, "prefix encoder"),
        ({"quantization_bit": 4}, "quantized"),
        ({"add_bias_linear": True}, "add_bias_linear"),
        ({"rmsnorm": False}, "LayerNorm"),
        ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
        ({"post_layer_norm": False}, "post_layer_norm"),
        ({"original_rope": False}, "original_rope"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, overrides, message):
    src = make_checkpoint(tmp_path / "src", native_glm(), config_overrides=overrides)
    with pytest.raises(ValueError, match=message):
        convert_chatglm_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_v1_config_without_modern_fields_is_refused():
    v1 = {"model_type": "chatglm", "hidden_size": 4096, "num_layers": 28, "vocab_size": 130528}
    with pytest.raises(ValueError, match="ChatGLM-6B v1.*DeepNorm"):
        config_from_chatglm(v1)


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_native_configs_are_sent_to_their_own_direction(model_type):
    native = {"model_type": model_type, "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
              "intermediate_size": 96, "multi_query_attention": True, "ffn_hidden_size": 96}  # fmt: skip
    with pytest.raises(ValueError, match=f"native {model_type} config.*from-{model_type}`"):
        config_from_chatglm(native)


def _int8_qkv(state):
    key = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    state[key] = state[key].to(torch.int8)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.update({"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 8)}),
            "prefix encoder",
        ),
        (
            lambda s: s.update(
                {"transformer.encoder.layers.0.self_attention.query_key_value.weight_scale": torch.ones(4)}
            ),
            "quantized",
        ),
        (_int8_qkv, "quantized"),
        (
            lambda s: s.update({"transformer.layers.0.attention.query_key_value.weight": torch.zeros(4, 4)}),
            "ChatGLM-6B v1",
        ),
        (lambda s: s.update({"transformer.something_new.weight": torch.zeros(2)}), "unknown THUDM weight"),
        (lambda s: s.pop("transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"), "missing 1 weights"),
        (lambda s: s.update({"transformer.encoder.final_layernorm.weight": torch.ones(3)}), "shape"),
    ],
)
def test_unsupported_or_broken_weights_are_refused(tmp_path, edit, message):
    native = native_glm()
    state = thudm_state_dict(native)
    edit(state)
    src = write_checkpoint(tmp_path / "src", state, thudm_config(native))
    with pytest.raises(ValueError, match=message):
        convert_chatglm_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_missing_config_and_missing_weights_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        convert_chatglm_checkpoint(tmp_path / "empty", tmp_path / "dst")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(thudm_config(native_glm())))
    with pytest.raises(ValueError, match="no weight files"):
        convert_chatglm_checkpoint(tmp_path / "empty", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_index_naming_a_missing_shard_leaves_no_destination(tmp_path):
    src = make_checkpoint(tmp_path / "src", native_glm(), shards=2)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="missing.*model-00002-of-00002.safetensors"):
        main(["from-chatglm", str(src), str(tmp_path / "dst")])
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_failure_mid_write_leaves_no_destination(tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "src", native_glm(), shards=2)
    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(package_io, "save_file", failing_save_file)  # the shard writer's (ShardWriter)
    with pytest.raises(OSError, match="disk full"):
        convert_chatglm_checkpoint(src, tmp_path / "out" / "dst", max_shard_size="20KB")
    assert len(calls) == 3 and os.listdir(tmp_path / "out") == []  # no dst, no partial temp folder


def test_existing_destination_is_not_overwritten(tmp_path):
    src = make_checkpoint(tmp_path / "src", native_glm())
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_chatglm_checkpoint(src, tmp_path / "dst")
    assert os.listdir(tmp_path / "dst") == ["keep.txt"]


# ------------------------------------------------------------------------------- CLI, remote code
def test_cli_and_remote_code_without_the_package(tmp_path):
    """The real CLI in a subprocess; the result loads with trust_remote_code where the package is absent."""
    native = native_glm(seed=12)
    src = make_checkpoint(tmp_path / "src", native, rope_ratio=500.0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    cli = [sys.executable, "-m", "bilingual_glm.conversion", "from-chatglm", str(src), str(tmp_path / "dst")]
    result = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "rope_theta 5e+06" in result.stdout
    model, logits = converted_logits(tmp_path / "dst", ids_for())
    with torch.no_grad():
        greedy = model.generate(ids_for()[:1, :4], max_new_tokens=6, do_sample=False)
    torch.save({"input_ids": ids_for(), "logits": logits, "greedy": greedy}, tmp_path / "expected.pt")
    check = [
        sys.executable,
        "-I",
        str(ROOT / "scripts" / "checks" / "check_remote_code.py"),
        str(tmp_path / "dst"),
        str(tmp_path / "expected.pt"),
    ]
    result = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
