"""The one rule for "does this device do fast bf16?" and the CPU fast paths it and the CPU-kind rule pick.

Every test here forces the CPU it pretends to be (``cpu_info``) or the bf16 answer (``BILINGUAL_GLM_BF16``),
so both kinds of path run whatever machine CI lands on, on shapes cheap even where bf16 is emulated.
"""

import ast
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bilingual_glm.modeling import kernels_bilingual_glm as kernels


def _cpu(model: str, vendor: str, family: str, number: str, flags: list[str], cap: str | None = None) -> dict:
    """A ``cpu_info()`` as the named machine reports it (``cap``: run under ``ISA_CAP_ENVS`` at that level)."""
    usable = sorted(kernels.usable_flags(set(flags), cap))
    return {
        "model": model,
        "vendor": vendor,
        "family": family,
        "model_number": number,
        "flags": usable,
        "cpu_flags": sorted(flags),
        "isa_cap": cap,
    }


AVX512_BF16 = ["avx2", "avx512_bf16", "avx512f", "fma"]
# Zen 3, issue 35 (2-core AMD EPYC family 25 model 1, `avx2 fma`, no AVX-512/bf16; torch 2.13.0):
# oneDNN fp32 linear / MKL 0.87 / 0.85 / 0.82 / 0.86 (qkv / gate_up / down / lm_head; a busier run
# 0.98 / 0.99 / 0.83 / 0.77): loses everywhere. bf16 matmul attention 0.26 (emulated bf16).
ZEN3 = _cpu("AMD EPYC 7B13", "AuthenticAMD", "25", "1", ["avx2", "fma"])
# Zen 4 (AMD EPYC family 25 model 17, benchmarks/README.md "CPU kinds"): oneDNN wins on every projection.
ZEN4 = _cpu("AMD EPYC", "AuthenticAMD", "25", "17", AVX512_BF16)
# The same Zen 4 capped at AVX2 (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS):
# oneDNN loses as on Zen 3, bf16 is emulated (torch's own bf16 routing follows ONEDNN_MAX_CPU_ISA too).
ZEN4_AS_AVX2 = _cpu("AMD EPYC", "AuthenticAMD", "25", "17", AVX512_BF16, cap="avx2")
ZEN5 = _cpu("AMD EPYC 9B45", "AuthenticAMD", "26", "2", AVX512_BF16)  # oneDNN 2.3x (490 vs 210 GFLOP/s)
XEON_AMX = _cpu(  # MKL faster than oneDNN on every projection
    "Intel(R) Xeon(R) Processor", "GenuineIntel", "6", "143", [*AVX512_BF16, "amx_bf16", "amx_tile"]
)
GRAVITON3 = _cpu("aarch64", "0x41", "", "", ["bf16"])  # never measured: the plain op
XEON_AVX512 = _cpu("Intel(R) Xeon(R) Gold 6148", "GenuineIntel", "6", "85", ["avx2", "avx512f", "fma"])


@pytest.fixture
def pretend(monkeypatch):
    """Make the rules see another CPU (and no forcing variable)."""
    monkeypatch.delenv(kernels.BF16_ENV, raising=False)

    def apply(cpu: dict) -> None:
        monkeypatch.setattr(kernels, "cpu_info", lambda: cpu)

    return apply


@pytest.mark.parametrize(
    ("cpu", "bf16", "onednn"),
    [
        (ZEN3, False, False),
        (ZEN4, True, True),
        (ZEN4_AS_AVX2, False, False),
        (ZEN5, True, True),
        (XEON_AMX, True, False),
        (GRAVITON3, True, False),
        (XEON_AVX512, False, False),
    ],
    ids=["zen3", "zen4", "zen4-capped-avx2", "zen5", "xeon-amx", "graviton3", "xeon-avx512-unmeasured"],
)
def test_rules_per_cpu_kind(pretend, cpu, bf16, onednn):
    """One row per measured kind (figures above and in benchmarks/README.md), plus kinds never measured,
    which get the plain op."""
    pretend(cpu)
    assert kernels.fast_bf16("cpu") is bf16
    assert kernels.onednn_fp32_wins() is onednn


def test_every_kind_the_onednn_table_names_is_pinned_above():
    pinned = {kernels.cpu_kind(cpu) for cpu in (ZEN3, ZEN4, ZEN4_AS_AVX2, ZEN5, XEON_AMX)}
    assert set(kernels.ONEDNN_FP32_WINS) <= pinned


@pytest.mark.parametrize(
    ("environ", "cap"),
    [
        ({}, None),
        ({"ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}, "avx2"),
        ({"MKL_ENABLE_INSTRUCTIONS": "AVX512"}, "avx512"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "avx2"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "amx"),
        ({"ATEN_CPU_CAPABILITY": "default"}, "sse"),
        ({"ATEN_CPU_CAPABILITY": " "}, None),
    ],
)
def test_isa_cap_reads_the_narrowest_library_switch(environ, cap):
    assert kernels.isa_cap(environ) == cap


def test_a_cap_hides_the_flags_above_it():
    flags = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert kernels.usable_flags(flags, None) == flags
    assert kernels.usable_flags(flags, "avx512_bf16") == {"avx2", "fma", "avx512f", "avx512_bf16"}
    assert kernels.usable_flags(flags, "avx2") == {"avx2", "fma"}
    assert kernels.usable_flags(flags, "sse") == set()
    assert kernels.usable_flags({"bf16"}, "avx2") == {"bf16"}  # arm64 flags are not x86 levels


def test_cpu_info_follows_the_caps_of_this_process():
    """The libraries read the caps at start-up, so the check runs in a fresh process."""
    code = "from bilingual_glm.modeling.kernels_bilingual_glm import cpu_info as c; print(c()['flags'], c()['isa_cap'])"
    env = {**os.environ, **{name: "AVX2" for name in kernels.ISA_CAP_ENVS}}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    flags, cap = result.stdout.strip().rsplit(" ", 1)
    assert cap == "avx2"
    assert set(ast.literal_eval(flags)) <= {"avx2", "fma"}


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
    assert set(info) == {"model", "vendor", "family", "model_number", "flags", "cpu_flags", "isa_cap"}
    assert isinstance(info["model"], str) and info["model"]
    assert set(info["flags"]) <= set(info["cpu_flags"])
    assert set(info["cpu_flags"]) <= {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16"}
    assert info["isa_cap"] == kernels.isa_cap()


@pytest.mark.skipif(kernels._ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")
def test_only_kinds_where_onednn_won_take_it(pretend):
    x, weight = torch.randn(64, 128), torch.randn(256, 128, requires_grad=True)  # above the size threshold
    for cpu in (XEON_AMX, ZEN3, ZEN4_AS_AVX2, GRAVITON3):
        pretend(cpu)
        assert type(kernels.linear(x, weight).grad_fn).__name__ != "_OneDnnLinearBackward", cpu["model"]
    for cpu in (ZEN4, ZEN5):
        pretend(cpu)
        assert type(kernels.linear(x, weight).grad_fn).__name__ == "_OneDnnLinearBackward", cpu["model"]


class _Attention(torch.nn.Module):
    training, attention_dropout = True, 0.0


def _qkv(batch=2, heads=4, kv_heads=2, length=24, dim=16):
    generator = torch.Generator().manual_seed(0)
    shapes = [(batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)]
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]


def test_bf16_matmul_attention_only_where_bf16_is_native(pretend):
    query, key, _ = _qkv()
    module = _Attention()
    for cpu, expected in ((ZEN5, True), (ZEN4, True), (XEON_AMX, True), (ZEN3, False), (ZEN4_AS_AVX2, False)):
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
