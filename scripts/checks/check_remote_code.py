"""Load an exported folder through remote code only and compare with logits saved beside it.

Run by the tests (and scripts/checks/check_export_venv.sh) in a process where `bilingual_glm` cannot be
imported, so only the flat files inside the folder can be what runs. Exits non-zero on any mismatch.

    python scripts/checks/check_remote_code.py FOLDER EXPECTED.pt [--atol 1e-6]
"""

import argparse
import sys

sys.modules["bilingual_glm"] = None  # an import of the package now fails loudly

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("expected", help="torch file with input_ids, logits and greedy continuation")
    parser.add_argument("--atol", type=float, default=1e-6)
    args = parser.parse_args()
    expected = torch.load(args.expected, weights_only=True)

    config = AutoConfig.from_pretrained(args.folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
        generated = model.generate(
            expected["input_ids"][:1, :4], max_new_tokens=expected["greedy"].shape[1] - 4, do_sample=False
        )
    delta = (logits - expected["logits"]).abs().max().item()
    same_greedy = torch.equal(generated, expected["greedy"])
    AutoModelForSequenceClassification.from_pretrained(args.folder, trust_remote_code=True, num_labels=2)
    print(
        f"transformers {transformers.__version__}: {type(config).__name__} max|dlogit|={delta:.3g} "
        f"greedy_equal={same_greedy}"
    )
    tokenizer_ok = check_tokenizer(args.folder, expected)
    return 0 if delta <= args.atol and same_greedy and tokenizer_ok else 1


def check_tokenizer(folder: str, expected: dict) -> bool:
    """``AutoTokenizer.from_pretrained(folder)`` without ``trust_remote_code`` gives the saved ids, and asks no
    question where the tokenizer alone decides: transformers 4.x reads tokenizer_config.json's
    ``tokenizer_class`` and stops there. transformers 5.x first loads the model's config, whose ``auto_map``
    (the model's remote code) makes it ask once on a terminal; answered or not, the tokenizer is the same.
    """
    if "tokenizer_ids" not in expected:
        return True
    import builtins

    from transformers import AutoTokenizer

    asked = []

    def no_terminal(prompt: str = "") -> str:  # count the question, answer as a closed stdin does
        asked.append(prompt)
        raise EOFError

    builtins.input = no_terminal
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(expected["tokenizer_text"])["input_ids"]
    same_ids = ids == expected["tokenizer_ids"].tolist()
    major = int(transformers.__version__.split(".")[0])
    quiet = not asked or major >= 5
    print(f"tokenizer: {type(tokenizer).__name__} same_ids={same_ids} questions={len(asked)}")
    return same_ids and quiet


if __name__ == "__main__":
    sys.exit(main())
