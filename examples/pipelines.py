"""The two transformers pipelines a BilingualGlm folder plugs into: text generation and text classification.

    python examples/pipelines.py --generator runs/train-mini --classifier runs/sentiment

``--generator``: any causal LM folder (pretrained or finetuned); ``--classifier``: a folder written by
``finetune.py --task classification``. Both load through their own code (``trust_remote_code=True``).
"""

import argparse

from transformers import pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", help="Causal LM folder for pipeline('text-generation').")
    parser.add_argument("--classifier", help="Classification folder for pipeline('text-classification').")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args(argv)
    if not (args.generator or args.classifier):
        parser.error("give --generator and/or --classifier")

    if args.generator:
        generate = pipeline("text-generation", model=args.generator, trust_remote_code=True)
        for prompt in ("中国人民", "To be, or not to be"):
            output = generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
            print(f"text-generation: {output[0]['generated_text']!r}")
        chat = generate(
            [{"role": "user", "content": "你好"}], max_new_tokens=args.max_new_tokens, do_sample=False
        )
        print(f"text-generation (chat): {chat[0]['generated_text'][-1]!r}")
    if args.classifier:
        classify = pipeline("text-classification", model=args.classifier, trust_remote_code=True)
        texts = ["房间很干净，服务也很热情，下次还来。", "等了两个小时还没上菜，太差了。"]
        for text, result in zip(texts, classify(texts), strict=True):
            print(f"text-classification: {text} -> {result['label']} ({result['score']:.3f})")


if __name__ == "__main__":
    main()
