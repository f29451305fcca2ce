import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import bilingual_glm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def key_compile_caches_on_cpu_capability() -> str:
    """Tag torch.compile's on-disk caches with the CPU vector ISA this process runs (a torch bug's workaround).

    Inductor's FX graph cache key (torch 2.13) leaves out the ISA that ``ATEN_CPU_CAPABILITY`` picks: a graph
    compiled on this AVX-512 CPU (16-lane loops) is served to the AVX2-capped pass that CI runs next, built
    with ``-mavx2`` (8-lane vectors), and writes half of each output: the compiled model's logits turn NaN.
    ``cache_key_tag`` is part of every compile cache key; the env var carries the tag into subprocesses.
    Idempotent: a tag inherited from a parent with another ISA is replaced, not extended.
    """
    mark = "cpu_capability="
    inherited = torch.compiler.config.cache_key_tag.split()
    tag = " ".join(
        [t for t in inherited if not t.startswith(mark)] + [mark + torch.backends.cpu.get_cpu_capability()]
    )
    torch.compiler.config.cache_key_tag = os.environ["TORCH_COMPILE_CACHE_KEY_TAG"] = tag
    return tag


key_compile_caches_on_cpu_capability()


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Import a script that is not a package module (train.py, finetune.py, app.py, examples) by path.

    It is registered in ``sys.modules`` first: dataclasses look their module up while a class is built.
    """
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def hand_built_native_config(config_class: type, rope_theta: float) -> object:
    """A native Glm/Glm4 config written the way a user would (theta in rope_parameters, GQA 6/2, head_dim
    8 != 48/6, a list of eos ids): the conversion must read every field from transformers' own layout."""
    return config_class(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5},
        pad_token_id=0,
        eos_token_id=[1, 2],
    )


# Shapes varied across the parity tests: GQA ratios, tied/untied, head_dim != hidden/heads.
RANDOM_CONFIGS = [
    dict(),
    dict(num_key_value_heads=4),
    dict(num_key_value_heads=1, head_dim=24, tie_word_embeddings=True),
    dict(num_attention_heads=6, num_key_value_heads=3, head_dim=8, hidden_size=40, attention_bias=False),
    dict(num_hidden_layers=3, partial_rotary_factor=0.25, rope_theta=500000.0, rms_norm_eps=1e-6),
]


def perturbed_model(
    seed: int = 0, dtype: torch.dtype = torch.float32, preset: str = "tiny", **overrides
) -> torch.nn.Module:
    """Tiny causal LM with every weight moved off its init (norms are ones, biases zero otherwise), and, on an MoE
    preset, random router correction biases (zeros would hide the bias's part in choosing experts)."""
    torch.manual_seed(seed)
    config = bilingual_glm.BilingualGlmConfig.from_preset(preset, **overrides)
    model = bilingual_glm.BilingualGlmForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    perturb_correction_biases(model, seed)
    return model.to(dtype).eval()


def moe_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """``perturbed_model`` of the ``moe-tiny`` preset."""
    return perturbed_model(seed, preset="moe-tiny", **overrides)


def perturb_correction_biases(model: torch.nn.Module, seed: int) -> None:
    """Random ``e_score_correction_bias`` in every MoE router, from their own generator (the weights' draws stay
    as they were)."""
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.05)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """One small bilingual tokenizer (vocab 1024, 1500 demo documents) shared by the script tests."""
    from bilingual_glm.corpora import load_demo_corpus
    from bilingual_glm.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    texts = load_demo_corpus("train").shuffle(seed=0).select(range(1500))["text"]
    train_tokenizer(texts, vocab_size=1024).save_pretrained(path)
    return path


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return perturbed_model()
