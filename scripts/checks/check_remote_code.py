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
    return 0 if delta <= args.atol and same_greedy else 1


if __name__ == "__main__":
    sys.exit(main())
