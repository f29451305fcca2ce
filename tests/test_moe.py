"""Mixture-of-Experts layers (``glm4_moe``'s): routing, grouped experts, balancing, the half-split rotary
layout, and everything the dense model does (2D positions, prefix attention, cache, checkpointing, LoRA,
train.py) on an MoE model. Parity with native ``Glm4MoeForCausalLM`` and conversion: test_glm4_moe.py."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers.models.glm4_moe import modeling_glm4_moe as native_glm4_moe

from bilingual_glm import BilingualGlmConfig, BilingualGlmForCausalLM
from bilingual_glm.data.blank_infilling import BlankInfillingCollator
from bilingual_glm.data.mlm import MlmCollator
from bilingual_glm.finetuning.arguments import LORA_TARGETS
from bilingual_glm.infill import infill
from bilingual_glm.modeling import modeling_bilingual_glm as modeling

from .conftest import moe_model
from .test_train import read_log, run_train


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(11, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))


def routers(model: torch.nn.Module) -> list[modeling.BilingualGlmTopkRouter]:
    return [m for m in model.modules() if isinstance(m, modeling.BilingualGlmTopkRouter)]


# ------------------------------------------------------------------------------------------ config
def test_moe_is_off_by_default_and_folders_without_the_fields_load_dense(tmp_path):
    config = BilingualGlmConfig.from_preset("tiny")
    assert not config.is_moe and config.rotary_interleaved and not config.use_qk_norm
    saved = config.to_dict()
    for name in ("n_routed_experts", "use_qk_norm", "rotary_interleaved", "router_bias_update_rate"):
        saved.pop(name)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = BilingualGlmConfig.from_pretrained(tmp_path)
    assert not reloaded.is_moe and reloaded.rotary_interleaved
    names = BilingualGlmForCausalLM(reloaded).state_dict()
    assert not [name for name in names if "experts" in name or "q_norm" in name or "mlp.gate." in name]


def test_moe_model_has_glm4_moe_module_names_and_dense_first_layers():
    model = moe_model()
    first, second = model.model.layers
    assert isinstance(first.mlp, modeling.BilingualGlmMLP)
    assert isinstance(second.mlp, modeling.BilingualGlmMoE)
    names = set(model.state_dict())
    for name in (
        "model.layers.0.mlp.gate_up_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.mlp.shared_experts.gate_up_proj.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.1.self_attn.k_norm.weight",
    ):
        assert name in names, name
    assert not [name for name in names if "tokens_per_expert" in name]  # a training tally, not a weight
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape == (4, 2 * 32, 64)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_routed_experts": -1}, "n_routed_experts"),
        ({"n_group": 3}, "n_group"),  # 4 experts do not split into 3 groups
        ({"n_group": 4}, "n_group"),  # groups of one expert: a group is scored by its best two
        ({"n_group": 2, "topk_group": 3}, "topk_group"),
        ({"n_group": 2, "topk_group": 1, "num_experts_per_tok": 3}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"first_k_dense_replace": 3}, "first_k_dense_replace"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"router_bias_update_rate": -1e-3}, "router_bias_update_rate"),
        ({"rotary_interleaved": "no"}, "rotary_interleaved"),
    ],
)
def test_bad_moe_fields_are_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        BilingualGlmConfig.from_preset("moe-tiny", **overrides)


def test_moe_presets_have_their_documented_sizes():
    def count(name: str) -> tuple[int, int]:
        """(parameters, parameters one token uses), embeddings left out (MoE sizes are quoted so)."""
        with torch.device("meta"):
            model = BilingualGlmForCausalLM(BilingualGlmConfig.from_preset(name))
        config = model.config
        embeddings = {id(p): p.numel() for p in (model.model.embed_tokens.weight, model.lm_head.weight)}
        total = sum(p.numel() for p in model.parameters()) - sum(embeddings.values())
        if not config.is_moe:
            return total, total
        unused_experts = config.n_routed_experts - config.num_experts_per_tok
        moe_layers = config.num_hidden_layers - config.first_k_dense_replace
        return (
            total,
            total - moe_layers * unused_experts * 3 * config.hidden_size * config.moe_intermediate_size,
        )

    air_total, air_active = count("glm-4.5-air")
    assert 104e9 <= air_total <= 107e9 and 11.5e9 <= air_active <= 12.5e9  # "106B-A12B"
    (mini, _), (moe_total, moe_active) = count("mini"), count("moe-mini")
    assert moe_active < mini < moe_total  # less compute per token than mini, more parameters


# ----------------------------------------------------------------------------------------- rotary
def test_half_split_rotary_equals_glm4_moe_rotary():
    config = BilingualGlmConfig.from_preset("moe-tiny")
    native_config = native_glm4_moe.Glm4MoeConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )  # fmt: skip
    positions = torch.arange(9).unsqueeze(0) + 3
    query, key = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16)
    cos, sin = modeling.BilingualGlmRotaryEmbedding(config)(query, positions)
    ours = [modeling.apply_rotary_pos_emb(x, cos, sin, half_split=config.rotary_dim) for x in (query, key)]
    native_cos, native_sin = native_glm4_moe.Glm4MoeRotaryEmbedding(native_config)(query, positions)
    native = native_glm4_moe.apply_rotary_pos_emb(query, key, native_cos, native_sin)
    for a, b in zip(ours, native, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    interleaved = modeling.apply_rotary_pos_emb(query, cos, sin)
    assert not torch.allclose(interleaved, ours[0])  # the layouts differ: the switch matters


def test_zero_block_positions_equal_1d_positions_and_block_positions_count():
    model, ids = moe_model(), tokens(2, 10)
    plain = torch.arange(10).expand(2, 10)
    zero_blocks = torch.stack((plain, torch.zeros_like(plain)), dim=1)
    with torch.no_grad():
        one_d = model(ids, position_ids=plain).logits
        torch.testing.assert_close(model(ids, position_ids=zero_blocks).logits, one_d, rtol=0, atol=1e-6)
        blocks = zero_blocks.clone()
        blocks[:, 1, 6:] = torch.arange(1, 5)
        assert not torch.allclose(model(ids, position_ids=blocks).logits[:, 6:], one_d[:, 6:], atol=1e-4)


# ---------------------------------------------------------------------------------------- experts
def test_grouped_experts_equal_a_per_token_reference():
    model = moe_model()
    moe = model.model.layers[1].mlp
    hidden = torch.randn(2, 7, 64)
    with torch.no_grad():
        _, weights, chosen = moe.gate(hidden)
        flat = hidden.reshape(-1, 64)
        expected = torch.zeros_like(flat)
        for token in range(flat.shape[0]):
            for slot in range(chosen.shape[1]):
                expert = int(chosen[token, slot])
                gate, up = F.linear(flat[token], moe.experts.gate_up_proj[expert]).chunk(2)
                out = F.linear(F.silu(gate) * up, moe.experts.down_proj[expert])
                expected[token] += weights[token, slot] * out
        expected += moe.shared_experts(hidden).reshape(-1, 64)
        torch.testing.assert_close(moe(hidden).reshape(-1, 64), expected, rtol=0, atol=1e-6)


def test_router_limits_choice_to_the_best_groups_and_scales_weights():
    config = BilingualGlmConfig.from_preset(
        "moe-tiny", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
        routed_scaling_factor=2.5,
    )  # fmt: skip
    router = modeling.BilingualGlmTopkRouter(config)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(50, 64)
    scores, weights, chosen = router(hidden)
    groups = (scores + router.e_score_correction_bias).view(50, 4, 2).topk(2, -1)[0].sum(-1)
    best_groups = groups.topk(2, -1)[1]
    for token in range(50):
        assert set((chosen[token] // 2).tolist()) <= set(best_groups[token].tolist())
    torch.testing.assert_close(weights.sum(-1), torch.full((50,), 2.5))  # normalised, then scaled


def test_correction_bias_chooses_experts_but_does_not_weight_them():
    config = BilingualGlmConfig.from_preset("moe-tiny", num_experts_per_tok=1, norm_topk_prob=False)
    router = modeling.BilingualGlmTopkRouter(config)
    hidden = torch.randn(20, 64)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    scores, weights, chosen = router(hidden)
    assert (chosen == 2).all()
    torch.testing.assert_close(weights[:, 0], scores[:, 2])  # the unbiased score (all 0.5: zero weights)


def test_bias_update_lowers_overloaded_experts_and_resets_the_count():
    model = moe_model().train()
    router = routers(model)[0]
    before = router.e_score_correction_bias.clone()
    model(tokens(2, 16))
    load = router.tokens_per_expert.clone()
    assert load.sum() == 2 * 16 * model.config.num_experts_per_tok
    assert model.expert_load() == {1: load.tolist()}
    model.update_router_biases()
    step = router.e_score_correction_bias - before
    expected = model.config.router_bias_update_rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(step, expected)
    assert router.tokens_per_expert.sum() == 0
    model.eval()
    model(tokens(2, 16))
    assert router.tokens_per_expert.sum() == 0  # counted in training only


def _balance_on_two_ranks(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = moe_model().train()
        model(tokens(2, 16, seed=rank))  # each rank its own batch, so its own expert load
        torch.save(routers(model)[0].tokens_per_expert.clone(), f"{out_dir}/load{rank}.pt")
        model.update_router_biases()
        torch.save(routers(model)[0].e_score_correction_bias, f"{out_dir}/bias{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~20 s of imports
def test_bias_update_follows_the_load_summed_over_processes(tmp_path):
    torch.multiprocessing.spawn(_balance_on_two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    loads = [torch.load(tmp_path / f"load{rank}.pt", weights_only=True) for rank in (0, 1)]
    biases = [torch.load(tmp_path / f"bias{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert not torch.equal(*loads)
    load, start = loads[0] + loads[1], routers(moe_model())[0].e_score_correction_bias
    expected = start + 1e-3 * torch.sign(load.mean() - load)  # moe-tiny's rate
    for bias in biases:
        torch.testing.assert_close(bias, expected, rtol=0, atol=1e-7)


def test_sequence_balance_loss_is_one_under_uniform_scores_and_trains_the_router():
    model = moe_model(router_aux_loss_coef=0.01).train()
    ids = tokens(2, 12)
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    plain = moe_model().train()(ids, labels=ids)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.loss, plain.loss + 0.01 * out.aux_loss)
    out.loss.backward()
    assert routers(model)[0].weight.grad.abs().sum() > 0
    with torch.no_grad():  # uniform scores: every choice of experts gives exactly 1
        routers(model)[0].weight.zero_()
    assert model(ids, labels=ids).aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert model.eval()(ids, labels=ids).aux_loss is None


# ---------------------------------------------------------------------------- what dense models do
def test_moe_incremental_decoding_and_greedy_generation_match_the_full_forward():
    model, ids = moe_model(), tokens(2, 9)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :5], use_cache=True)
        rest = model(ids[:, 5:], cache=first.past_key_values).logits
    torch.testing.assert_close(torch.cat((first.logits, rest), dim=1), full, rtol=0, atol=1e-5)
    cached = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False)
    uncached = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_moe_gradient_checkpointing_gives_the_same_gradients():
    ids = tokens(2, 8)

    def gradients(checkpointing: bool) -> dict:
        model = moe_model(router_aux_loss_coef=0.01).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(grad, checkpointed[name], rtol=0, atol=1e-6, msg=name)


def test_prefix_attention_and_blank_infilling_train_an_moe_model():
    model = moe_model().train()
    config = model.config
    collate = BlankInfillingCollator(seed=0, mixture=(1, 1, 1), sentence_end_ids=(11, 12))
    examples = [{"input_ids": tokens(1, 60, seed=s)[0].tolist()} for s in range(3)]
    for batch in (collate(examples), MlmCollator(vocab_size=config.vocab_size, seed=0)(examples)):
        assert batch["prefix_lengths"].gt(0).all()
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        model.zero_grad()
        loss.backward()
        assert model.model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_infill_fills_every_blank_with_an_moe_model(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = moe_model()
    filled, spans = infill(
        model, tokenizer, "我爱[MASK]。I love [sMASK].", max_new_tokens=4, return_spans=True
    )
    assert len(spans) == 2 and "[MASK]" not in filled and "[sMASK]" not in filled


def test_save_and_reload_keep_the_correction_bias_and_the_logits(tmp_path):
    model, ids = moe_model(), tokens(1, 8)
    model.save_pretrained(tmp_path)
    reloaded = BilingualGlmForCausalLM.from_pretrained(tmp_path).eval()
    for a, b in zip(routers(model), routers(reloaded), strict=True):
        assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)
    # Not bit-equal: the loaded weights sit at another memory alignment (8 bytes, not 64), which MKL's small
    # expert GEMMs round by (measured: 2.4e-7, same weights, buffers and strides).
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_lora_default_targets_attention_dense_and_shared_experts_not_routed_experts_or_router():
    from peft import LoraConfig, get_peft_model

    model = moe_model()
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS.split(",")))
    targeted = {
        name.removeprefix("base_model.model.") for name, _ in lora.named_modules() if name.endswith(".lora_A")
    }
    targeted = {name.removesuffix(".lora_A") for name in targeted}
    expected = {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    expected |= {"model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"}
    expected |= {
        "model.layers.1.mlp.shared_experts.gate_up_proj",
        "model.layers.1.mlp.shared_experts.down_proj",
    }
    assert targeted == expected
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    ids = tokens(1, 6)
    lora.train()(ids, labels=ids).loss.backward()


# --------------------------------------------------------------------------------------- train.py
@pytest.mark.slow  # CI time (Makefile): heavy; run by make test-slow
def test_train_py_trains_an_moe_preset_and_logs_the_expert_load(tmp_path, tokenizer_dir):
    out = tmp_path / "moe"
    run_train(
        ["--preset", "moe-tiny", "--objective", "clm:0.8,glm:0.2", "--max_steps", "4", "--logging_steps", "2"]
        + ["--output_dir", str(out), "--tokenizer", str(tokenizer_dir)]
    )
    log = read_log(out)
    steps = [record for record in log if "loss" in record]
    assert len(steps) == 2
    for record in (*steps, log[-1]):
        (shares,) = record["expert_load"].values()  # one MoE layer
        assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=1e-3)
    model = BilingualGlmForCausalLM.from_pretrained(out)
    bias = routers(model)[0].e_score_correction_bias
    steps_of_rate = bias / 1e-3  # each of the 4 steps moved each bias by +-rate (or 0: exactly mean load)
    assert 0 < steps_of_rate.abs().max() <= 4 + 1e-4
    torch.testing.assert_close(steps_of_rate, steps_of_rate.round(), rtol=0, atol=1e-4)
