"""GLM-4.5 / GLM-4.5-Air (transformers' ``glm4_moe``): parity with Glm4MoeForCausalLM both ways (logits, greedy
output and the experts each router picks), folder round trips in the released per-expert layout and the fused
one transformers 5 can save, the MTP layer reported, refusals, and the streaming converter's memory plan."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Glm4MoeForCausalLM

from bilingual_glm import BilingualGlmConfig, BilingualGlmForCausalLM
from bilingual_glm.chatglm import find_weight_files
from bilingual_glm.conversion import (
    EXPERT,
    GATE_UP,
    GLM4_MOE_KEY_MAP,
    from_transformers_glm4_moe,
    main,
    plan_folder_memory,
    to_transformers_glm,
    to_transformers_glm4_moe,
)

from .conftest import moe_model, perturb_correction_biases, perturbed_model

TOLERANCE = 1e-5
ROUTERS = ("BilingualGlmTopkRouter", "Glm4MoeTopkRouter")

# moe-tiny (4 experts top-2, 1 shared, first layer dense, qk-norm) and variations of what glm4_moe can vary.
MOE_CONFIGS = [
    pytest.param(dict(), id="qknorm-shared1-dense1"),
    pytest.param(
        dict(use_qk_norm=False, n_shared_experts=0, first_k_dense_replace=0, n_routed_experts=8, n_group=4,
             topk_group=2, num_experts_per_tok=3),
        id="noqknorm-shared0-dense0-groups4of2",
    ),
    pytest.param(
        dict(num_hidden_layers=3, first_k_dense_replace=2, n_routed_experts=8, n_group=2, topk_group=1,
             routed_scaling_factor=2.5, norm_topk_prob=False),
        id="dense2-groups2of1-scale2.5-unnormed",
    ),
    pytest.param(
        dict(n_shared_experts=2, attention_bias=False, tie_word_embeddings=True, num_key_value_heads=1,
             rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                              "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
        id="shared2-tied-mqa-yarn",
    ),
    pytest.param(
        dict(head_dim=24, n_group=2, topk_group=1,
             rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
        id="headdim24-groups2of1-linear",
    ),
]  # fmt: skip


def _inputs(config, batch=3, length=17, seed=5):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits_and_experts(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits, and the experts every MoE layer's router picked for each token (sorted: top-k is unordered)."""
    chosen = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: chosen.append(out[2].sort(dim=-1).values))
        for module in model.modules()
        if type(module).__name__ in ROUTERS
    ]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, chosen


def assert_same_model(ours: torch.nn.Module, native: torch.nn.Module, ids: torch.Tensor) -> None:
    """Logits within TOLERANCE, the same experts chosen in every MoE layer, the same greedy continuation."""
    ours_logits, ours_experts = _logits_and_experts(ours, ids)
    native_logits, native_experts = _logits_and_experts(native, ids)
    assert (ours_logits - native_logits).abs().max().item() <= TOLERANCE
    moe_layers = sum(ours.config.is_moe_layer(i) for i in range(ours.config.num_hidden_layers))
    assert len(ours_experts) == len(native_experts) == moe_layers > 0
    for layer, (a, b) in enumerate(zip(ours_experts, native_experts, strict=True)):
        assert torch.equal(a, b), f"MoE layer {layer} routed differently"
    with torch.no_grad():
        greedy = [model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False) for model in (ours, native)]
    assert torch.equal(*greedy)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in find_weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


# ----------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("overrides", MOE_CONFIGS)
def test_ours_to_native_glm4_moe_logits_experts_and_greedy(overrides):
    ours = moe_model(seed=11, **overrides)
    native = to_transformers_glm4_moe(ours)
    assert isinstance(native, Glm4MoeForCausalLM) and native.config.num_mtp_layers == 0
    assert_same_model(ours, native, _inputs(ours.config))


@pytest.mark.parametrize("overrides", MOE_CONFIGS)
def test_native_glm4_moe_to_ours_logits_experts_and_greedy(overrides):
    native = to_transformers_glm4_moe(moe_model(seed=12, **overrides))
    torch.manual_seed(3)
    with torch.no_grad():  # perturb the native model itself (norms, experts, router) so nothing leaks from ours
        for parameter in native.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    perturb_correction_biases(native, seed=7)
    ours = from_transformers_glm4_moe(native)
    assert ours.config.is_moe and ours.config.rotary_interleaved is False
    assert_same_model(ours, native, _inputs(native.config))


def test_glm4_moe_key_map_covers_every_weight_both_ways():
    """Every tensor of a model with dense and MoE layers, qk-norm and shared experts has exactly one row."""
    model = moe_model(num_hidden_layers=3, first_k_dense_replace=1)
    ours_keys = {k for k in model.state_dict() if "rotary_emb" not in k}
    templates = {key.replace(".0.", ".{i}.").replace(".1.", ".{i}.").replace(".2.", ".{i}.") for key in ours_keys}
    assert templates == {ours for ours, _ in GLM4_MOE_KEY_MAP}
    native_keys = {k for k in to_transformers_glm4_moe(model).state_dict() if "rotary_emb" not in k}
    unfused = {  # native splits the dense and shared-expert gate_up; it keeps the routed experts fused in memory
        key.replace("gate_up_proj", f"{part}_proj") if key.endswith("gate_up_proj.weight") else key
        for key in ours_keys
        for part in ("gate", "up")
    }
    assert native_keys == unfused
    assert sum(EXPERT in native for _, native in GLM4_MOE_KEY_MAP) == 2
    assert sum(GATE_UP in native for _, native in GLM4_MOE_KEY_MAP) == 3


# ---------------------------------------------------------------------------------------- folders
def load_ours(folder) -> BilingualGlmForCausalLM:
    """Our model from a converted folder, in fp32, as users load it (the routers' correction biases included:
    ``test_from_pretrained_keeps_the_router_correction_biases``)."""
    return BilingualGlmForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def write_released_folder(native: Glm4MoeForCausalLM, folder, shards: int = 2) -> dict[str, torch.Tensor]:
    """A folder as zai-org releases GLM-4.5 (written by hand, not by transformers): experts per expert, dense and
    shared MLPs unfused, an MTP layer at ``model.layers.{num_hidden_layers}``, sharded with an index."""
    config = native.config
    state, layers = {}, config.num_hidden_layers
    for key, tensor in native.state_dict().items():
        if "rotary_emb" in key or (config.tie_word_embeddings and key == "lm_head.weight"):
            continue
        if ".mlp.experts." in key:  # [E, ...] -> one tensor per expert
            prefix, name = key.rsplit(".", 1)
            for j, expert in enumerate(tensor):
                if name == "gate_up_proj":
                    gate, up = expert.chunk(2)
                    state[f"{prefix}.{j}.gate_proj.weight"], state[f"{prefix}.{j}.up_proj.weight"] = gate, up
                else:
                    state[f"{prefix}.{j}.down_proj.weight"] = expert
        else:
            state[key] = tensor
    last = f"model.layers.{layers - 1}."
    mtp = {key.replace(last, f"model.layers.{layers}."): t + 1 for key, t in state.items() if key.startswith(last)}
    hidden = config.hidden_size
    mtp.update({f"model.layers.{layers}.{name}": torch.randn(*shape) for name, shape in (
        ("eh_proj.weight", (hidden, 2 * hidden)), ("enorm.weight", (hidden,)), ("hnorm.weight", (hidden,)),
        ("shared_head.norm.weight", (hidden,)), ("shared_head.head.weight", (config.vocab_size, hidden)),
    )})  # fmt: skip
    state.update({key: t.to(state["model.embed_tokens.weight"].dtype) for key, t in mtp.items()})
    state = {key: t.contiguous().clone() for key, t in state.items()}
    folder.mkdir(parents=True)
    keys, weight_map = sorted(state), {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state[key] for key in keys[shard::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config_dict = {**json.loads(config.to_json_string()), "num_nextn_predict_layers": 1, "num_mtp_layers": 1}
    (folder / "config.json").write_text(json.dumps(config_dict))
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_released_folder_round_trips_bit_for_bit_and_the_mtp_layer_is_reported(tmp_path, dtype, caplog):
    ours = moe_model(seed=4, num_hidden_layers=3, n_routed_experts=8, n_group=2, topk_group=1)
    native = to_transformers_glm4_moe(ours).to(dtype)
    for name, buffer in native.named_buffers():  # fp32 in released files whatever the weights' dtype
        if name.endswith("e_score_correction_bias"):
            buffer.data = buffer.data.float()
    source = write_released_folder(native, tmp_path / "released")
    mtp_keys = {key for key in source if key.startswith("model.layers.3.")}
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in source and len(mtp_keys) > 30

    with caplog.at_level(logging.WARNING, logger="bilingual_glm.conversion"):
        assert main(["from-glm4-moe", str(tmp_path / "released"), str(tmp_path / "ours")]) == 0
    assert f"skipped {len(mtp_keys)} multi-token-prediction (MTP) tensors" in caplog.text
    converted = _tensors(tmp_path / "ours")
    assert converted["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert converted["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert main(["to-glm4-moe", str(tmp_path / "ours"), str(tmp_path / "back"), "--max-shard-size", "60KB"]) == 0
    assert len(find_weight_files(tmp_path / "back")) > 2

    back = _tensors(tmp_path / "back")
    assert back.keys() == source.keys() - mtp_keys
    for key, tensor in back.items():
        assert tensor.dtype == source[key].dtype and torch.equal(tensor, source[key]), key
    reloaded = Glm4MoeForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    ours_reloaded = load_ours(tmp_path / "ours")
    assert reloaded.config.num_mtp_layers == 0 and ours_reloaded.config.mask_token_id == 1
    assert_same_model(ours_reloaded, reloaded, _inputs(ours.config))


@pytest.mark.parametrize("original_format", [True, False], ids=["save_pretrained-per-expert", "fused"])
def test_folders_saved_by_transformers_convert_in_either_expert_layout(tmp_path, original_format):
    """transformers 5.25's ``save_pretrained`` writes experts per expert (reverting its load-time fusion), and
    fused with ``save_original_format=False``; n_shared_experts=0 adds 0-row shared-expert tensors."""
    native = to_transformers_glm4_moe(moe_model(seed=6, n_shared_experts=0))
    native.save_pretrained(tmp_path / "native", save_original_format=original_format, max_shard_size="50KB")
    keys = _tensors(tmp_path / "native")
    assert ("model.layers.1.mlp.experts.gate_up_proj" in keys) is not original_format
    assert ("model.layers.1.mlp.experts.3.up_proj.weight" in keys) is original_format
    assert keys["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (0, 64)
    main(["from-glm4-moe", str(tmp_path / "native"), str(tmp_path / "ours")])
    ours = load_ours(tmp_path / "ours")
    assert_same_model(ours, native, _inputs(native.config))
    main(["to-glm4-moe", str(tmp_path / "ours"), str(tmp_path / "back")])
    assert_same_model(ours, Glm4MoeForCausalLM.from_pretrained(tmp_path / "back").eval(), _inputs(native.config))


def test_from_pretrained_keeps_the_router_correction_biases(tmp_path):
    native = to_transformers_glm4_moe(moe_model(seed=1))
    native.save_pretrained(tmp_path / "native")
    main(["from-glm4-moe", str(tmp_path / "native"), str(tmp_path / "ours")])
    stored = _tensors(tmp_path / "ours")["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert stored.abs().sum() > 0  # the converter wrote them
    loaded = BilingualGlmForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(loaded.model.layers[1].mlp.gate.e_score_correction_bias, stored)


# ----------------------------------------------------------------------------------------- guards
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rotary_interleaved=True), r"rotary_interleaved: glm4_moe cannot represent"),
        (dict(sandwich_norms=True), r"sandwich_norms: glm4_moe cannot represent"),
        (dict(n_routed_experts=0), r"n_routed_experts=0 is a dense model: convert it with to-glm"),
    ],
)
def test_what_glm4_moe_cannot_represent_is_refused_naming_the_field(tmp_path, overrides, message):
    model = moe_model(**overrides)
    with pytest.raises(ValueError, match=message):
        to_transformers_glm4_moe(model)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        main(["to-glm4-moe", str(tmp_path / "src"), str(tmp_path / "out" / "dst")])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_moe_model_into_dense_glm_points_to_glm4_moe():
    with pytest.raises(ValueError, match=r"no place for .*to-glm4-moe / to_transformers_glm4_moe"):
        to_transformers_glm(moe_model())


def _edit_released(folder, edit) -> None:
    """Apply ``edit`` to the tensors of a one-file released folder."""
    path = folder / "model.safetensors"
    state = _tensors(folder)
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "source, message",
    [
        ("dense_glm", r"holds a 'glm' checkpoint, from-glm4-moe reads 'glm4_moe': use from-glm /"),
        ("dense_ours", r"holds a 'bilingual_glm' checkpoint, from-glm4-moe reads 'glm4_moe': use to-glm /"),
        ("extra_key", r"no place for 1 source weights.*model\.layers\.1\.mlp\.experts\.2\.bias"),
        ("missing_expert", r"lacks 1 weights .*model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"),
        ("wrong_shape", r"experts\.0\.down_proj\.weight' has shape \(64, 31\), the config implies \(64, 32\)"),
    ],
)
def test_from_glm4_moe_refuses_naming_the_key_and_writes_nothing(tmp_path, source, message):
    src = tmp_path / "src"
    if source == "dense_glm":
        to_transformers_glm(perturbed_model()).save_pretrained(src)
    elif source == "dense_ours":
        perturbed_model().save_pretrained(src)
    else:
        to_transformers_glm4_moe(moe_model()).save_pretrained(src)
        edits = {
            "extra_key": lambda s: s.update({"model.layers.1.mlp.experts.2.bias": torch.zeros(3)}),
            "missing_expert": lambda s: s.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
            "wrong_shape": lambda s: s.update(
                {"model.layers.1.mlp.experts.0.down_proj.weight": torch.zeros(64, 31)}
            ),
        }
        _edit_released(src, edits[source])
    with pytest.raises(ValueError, match=message):
        main(["from-glm4-moe", str(src), str(tmp_path / "out" / "dst")])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_dtype_casts_everything_but_the_router_correction_bias(tmp_path):
    to_transformers_glm4_moe(moe_model()).save_pretrained(tmp_path / "native")
    main(["from-glm4-moe", str(tmp_path / "native"), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    dtypes = {key: t.dtype for key, t in _tensors(tmp_path / "bf16").items()}
    assert dtypes.pop("model.layers.1.mlp.gate.e_score_correction_bias") == torch.float32
    assert set(dtypes.values()) == {torch.bfloat16}


# ------------------------------------------------------------------------------------ memory plan
def test_memory_plan_cuts_the_shards_the_converter_writes(tmp_path):
    """The plan walks the converter's own groups with the shard writer's rule: its shards are the real ones."""
    native = to_transformers_glm4_moe(moe_model(seed=2, num_hidden_layers=3, n_routed_experts=8, vocab_size=128))
    write_released_folder(native, tmp_path / "released")
    main(["from-glm4-moe", str(tmp_path / "released"), str(tmp_path / "ours"), "--max-shard-size", "70KB"])
    main(["to-glm4-moe", str(tmp_path / "ours"), str(tmp_path / "back"), "--max-shard-size", "50KB"])
    for src, dst, direction, size in (("released", "ours", "from-glm4-moe", "70KB"),
                                      ("ours", "back", "to-glm4-moe", "50KB")):  # fmt: skip
        plan = plan_folder_memory(tmp_path / src, direction, max_shard_size=size)
        written = []
        for path in find_weight_files(tmp_path / dst):
            with safe_open(str(path), framework="pt") as handle:
                written.append(sum(handle.get_tensor(k).nbytes for k in handle.keys()))
        assert plan.shard_bytes == tuple(written) and len(written) > 2
        bound = max(plan.max_shard_bytes, plan.largest_tensor_bytes) + plan.largest_tensor_bytes // 8  # + a piece
        assert plan.largest_tensor_bytes <= plan.peak_bytes <= bound
    plan = plan_folder_memory(tmp_path / "released", "from-glm4-moe", max_shard_size="70KB")
    assert plan.peak_tensor.endswith("mlp.experts.gate_up_proj")  # experts outweigh the 128-token embedding


def test_glm45_air_conversion_holds_about_one_shard_or_one_expert_tensor():
    """GLM-4.5-Air (106B parameters, bf16, 2GB shards), from shapes on the meta device: the streaming
    conversion holds one shard's buffer or one layer's fused expert tensor (+ one expert's piece), not the
    214 GB model."""
    air = BilingualGlmConfig.from_preset("glm-4.5-air")
    experts_gate_up = 128 * 2 * 1408 * 4096 * 2  # one layer's fused [E, 2I, H] in bf16: 2.95 GB
    expert_piece = 1408 * 4096 * 2  # one expert's gate_proj: 11.5 MB
    for direction in ("from-glm4-moe", "to-glm4-moe"):
        plan = plan_folder_memory(air, direction, max_shard_size="2GB")
        assert 213e9 < plan.total_bytes < 215e9 and len(plan.shard_bytes) >= 90
        assert 4.6e9 < plan.largest_moe_layer_bytes < 4.7e9
        assert plan.peak_bytes < 0.015 * plan.total_bytes
    from_plan = plan_folder_memory(air, "from-glm4-moe", max_shard_size="2GB")
    assert from_plan.largest_tensor_bytes == experts_gate_up
    assert from_plan.peak_tensor.endswith("mlp.experts.gate_up_proj")
    assert experts_gate_up < from_plan.peak_bytes <= experts_gate_up + expert_piece  # the buffer was flushed
    to_plan = plan_folder_memory(air, "to-glm4-moe", max_shard_size="2GB")
    assert to_plan.peak_bytes <= 2e9  # per-expert slices are read one by one into the shard buffer
