"""The one rule for "does this device do fast bf16?" and the CPU fast paths it and the vendor rule pick.

Every test here forces the CPU it pretends to be (``cpu_info``) or the bf16 answer (``BILINGUAL_GLM_BF16``),
so both kinds of path run whatever machine CI lands on, on shapes cheap even where bf16 is emulated.
"""

import pytest
import torch
import torch.nn.functional as F

from bilingual_glm.modeling import kernels_bilingual_glm as kernels

ZEN3 = {"model": "AMD EPYC 7B13", "vendor": "AuthenticAMD", "family": "25", "model_number": "1"}
ZEN3["flags"] = ["avx2", "fma"]
ZEN5 = {**ZEN3, "model": "AMD EPYC 9B45", "family": "26", "flags": ["avx2", "avx512_bf16", "avx512f", "fma"]}
XEON_AMX = {
    "model": "Intel(R) Xeon(R) Processor",
    "vendor": "GenuineIntel",
    "family": "6",
    "model_number": "143",
}
XEON_AMX["flags"] = ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f", "fma"]
GRAVITON3 = {"model": "aarch64", "vendor": "0x41", "family": "", "model_number": "", "flags": ["bf16"]}


@pytest.fixture
def pretend(monkeypatch):
    """Make the rules see another CPU (and no forcing variable)."""
    monkeypatch.delenv(kernels.BF16_ENV, raising=False)

    def apply(cpu: dict) -> None:
        monkeypatch.setattr(kernels, "cpu_info", lambda: cpu)

    return apply


@pytest.mark.parametrize(
    ("cpu", "bf16", "onednn"),
    [(ZEN3, False, True), (ZEN5, True, True), (XEON_AMX, True, False), (GRAVITON3, True, False)],
)
def test_rules_per_cpu_kind(pretend, cpu, bf16, onednn):
    pretend(cpu)
    assert kernels.fast_bf16("cpu") is bf16
    assert kernels.onednn_fp32_wins() is onednn


@pytest.mark.parametrize(("value", "expected"), [("0", False), ("1", True)])
def test_environment_variable_overrides_the_hardware(pretend, monkeypatch, value, expected):
    for cpu in (ZEN3, XEON_AMX):
        pretend(cpu)
        monkeypatch.setenv(kernels.BF16_ENV, value)
        assert kernels.fast_bf16("cpu") is expected
        assert kernels.fast_bf16(torch.device("cpu")) is expected


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(kernels.BF16_ENV, "yes")
    with pytest.raises(ValueError, match="BILINGUAL_GLM_BF16 must be 0, 1 or auto, got 'yes'"):
        kernels.fast_bf16()


def test_cpu_info_reads_this_machine():
    info = kernels.cpu_info()
    assert set(info) == {"model", "vendor", "family", "model_number", "flags"}
    assert isinstance(info["model"], str) and info["model"]
    assert set(info["flags"]) <= {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16"}


@pytest.mark.skipif(kernels._ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")
def test_intel_keeps_torchs_fp32_linear_and_amd_takes_onednn(pretend):
    x, weight = torch.randn(64, 128), torch.randn(256, 128, requires_grad=True)  # above the size threshold
    pretend(XEON_AMX)
    assert type(kernels.linear(x, weight).grad_fn).__name__ != "_OneDnnLinearBackward"
    pretend(ZEN3)
    assert type(kernels.linear(x, weight).grad_fn).__name__ == "_OneDnnLinearBackward"


class _Attention(torch.nn.Module):
    training, attention_dropout = True, 0.0


def _qkv(batch=2, heads=4, kv_heads=2, length=24, dim=16):
    generator = torch.Generator().manual_seed(0)
    shapes = [(batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)]
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]


def test_bf16_matmul_attention_only_where_bf16_is_native(pretend):
    query, key, _ = _qkv()
    module = _Attention()
    for cpu, expected in ((ZEN5, True), (XEON_AMX, True), (ZEN3, False)):
        pretend(cpu)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernels.use_matmul_attention(module, query, key, None) is expected, cpu["model"]
        assert not kernels.use_matmul_attention(module, query, key, None)  # fp32 keeps SDPA everywhere


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_matmul_attention_matches_fp32_sdpa(masked):
    """The bf16 attention kernel itself, on shapes cheap even where bf16 is emulated: values and all
    three gradients close to fp32 SDPA (GQA, causal or a bool mask with an open prefix)."""
    query, key, value = _qkv()
    length = query.shape[2]
    mask = None
    if masked:
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        mask[:, :5] = True  # bidirectional prefix
        mask = mask.expand(query.shape[0], 1, length, length)
    grad = torch.randn(query.shape[0], length, query.shape[1], query.shape[3])
    scaling = query.shape[-1] ** -0.5

    def reference():
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2)

    results = []
    for attention in (
        lambda: kernels.matmul_attention_forward(_Attention(), query, key, value, mask, scaling)[0],
        reference,
    ):
        out = attention()
        results.append(
            [out.float().detach(), *torch.autograd.grad(out, (query, key, value), grad.to(out.dtype))]
        )
    for ours, exact in zip(*results, strict=True):
        assert ours.shape == exact.shape
        assert (ours.float() - exact).abs().max() < 0.05 * exact.abs().max()
        assert F.cosine_similarity(ours.float().flatten(), exact.flatten(), dim=0) > 0.999
