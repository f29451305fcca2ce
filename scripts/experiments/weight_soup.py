"""Average the weights of several finetunes of one pretrained model into one model folder (a "model soup").

    python scripts/experiments/weight_soup.py runs/cloze-a runs/cloze-b --output_dir runs/soup       # uniform soup
    python scripts/experiments/weight_soup.py runs/cloze-a/checkpoint-660 runs/cloze-a --setup_from runs/cloze-a \
        --output_dir runs/cloze-a-avg                                                   # one run's last checkpoints

Why: averaging the *predictions* of several finetunes buys about a point on the sentiment split
(``scripts/experiments/sentiment_ensemble.py``) but costs one forward per member at inference. Finetunes that start
from the same pretrained weights and add no new parameters (the GLM cloze task trains no head) tend to stay
in one low-loss basin, so averaging their *weights* (Wortsman et al., 2022, "Model soups") can keep much of
that gain in a single model with one forward. Whether it does here is measured in docs/finetune.md.

Every input folder must hold a ``model.safetensors`` with the same tensor names and shapes (a finetune
output or one of its ``checkpoint-*`` folders); anything else is refused by name. The output folder is a
copy of ``--setup_from`` (default: the first folder: tokenizer, ``run_config.json``, remote code), minus its
checkpoints, with the averaged weights; it loads with ``from_pretrained`` and is scored by
``sentiment_ensemble.py`` exactly as a finetune is. Like a conversion (``bilingual_glm.chatglm``), it is
written to a temporary folder and renamed into place, and an existing non-empty ``--output_dir`` is refused,
so a failure leaves no half-written soup and no folder is ever replaced.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bilingual_glm.io import atomic_folder, check_destination

WEIGHTS = "model.safetensors"
# Files of a finetune output that describe training, not the model: not carried into the soup.
NOT_COPIED = (
    "checkpoint-*",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
    "*_results.json",
    "log.jsonl",
    "README.md",
    WEIGHTS,
)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a finetune output or checkpoint folder")
    return load_file(path)


def average_weights(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the folders' weights, accumulated in fp64 and cast back to each dtype."""
    first = read_weights(folders[0])
    total = {name: tensor.double() for name, tensor in first.items()}
    for folder in folders[1:]:
        weights = read_weights(folder)
        if weights.keys() != first.keys():
            differ = sorted(weights.keys() ^ first.keys())[:3]
            raise ValueError(
                f"{folder / WEIGHTS}: tensor names differ from {folders[0] / WEIGHTS} ({differ})"
            )
        for name, tensor in weights.items():
            if tensor.shape != first[name].shape:
                raise ValueError(
                    f"{folder / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                    f"{folders[0] / WEIGHTS} has {tuple(first[name].shape)}"
                )
            total[name] += tensor.double()
    return {name: (tensor / len(folders)).to(first[name].dtype) for name, tensor in total.items()}


def write_soup(folders: list[Path], output_dir: Path, setup_from: Path | None = None) -> Path:
    """Average ``folders`` into ``output_dir`` (a copy of ``setup_from`` with the mean weights)."""
    setup_from = setup_from or folders[0]
    check_destination(output_dir)  # never replaces a folder, not even a member's own
    if not (setup_from / "config.json").is_file():
        raise FileNotFoundError(f"{setup_from / 'config.json'}: not found; --setup_from needs a model folder")
    soup = average_weights(folders)
    with atomic_folder(output_dir) as staging:
        shutil.copytree(setup_from, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
        save_file(soup, staging / WEIGHTS, metadata={"format": "pt"})
        members = {"members": [str(folder) for folder in folders], "setup_from": str(setup_from)}
        (staging / "soup.json").write_text(json.dumps(members, indent=2))
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="Finetune outputs or checkpoint-* folders.")
    parser.add_argument("--output_dir", type=Path, required=True, help="Where the averaged model goes.")
    parser.add_argument(
        "--setup_from",
        type=Path,
        default=None,
        help="The folder whose tokenizer, run_config.json and code the soup carries (default: the first).",
    )
    args = parser.parse_args(argv)
    write_soup(args.folders, args.output_dir, args.setup_from)
    print(f"wrote {args.output_dir} (mean of {len(args.folders)} folders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
