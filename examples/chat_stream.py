"""Chat with a model, streaming the answer token by token (chat template + TextIteratorStreamer).

    python examples/chat_stream.py runs/chat                      # interactive: empty line quits
    python examples/chat_stream.py runs/chat --message "你好" --message "Tell me a joke"

The chat template renders ``[gMASK]<sop><|user|>\\n...<|assistant|>``; every answer ends with
``<|endoftext|>`` (the eos token), so ``generate`` stops on its own. Generation runs in a thread and
the main thread prints text as it arrives.
"""

import argparse
from threading import Thread

from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def reply(model, tokenizer, history: list[dict], max_new_tokens: int) -> str:
    inputs = tokenizer.apply_chat_template(
        history, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    kwargs = dict(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=False)
    thread = Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    pieces = []
    for piece in streamer:  # yields decoded text as soon as it is printable
        print(piece, end="", flush=True)
        pieces.append(piece)
    thread.join()
    print()
    return "".join(pieces)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Model folder or Hub id (an sft finetune answers best).")
    parser.add_argument("--message", action="append", help="User turn(s) to send instead of reading stdin.")
    parser.add_argument("--system", default=None, help="Optional system prompt.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    history = [{"role": "system", "content": args.system}] if args.system else []
    messages = iter(args.message) if args.message else iter(lambda: input("user> "), "")
    for message in messages:
        history.append({"role": "user", "content": message})
        print("assistant> ", end="", flush=True)
        history.append(
            {"role": "assistant", "content": reply(model, tokenizer, history, args.max_new_tokens)}
        )


if __name__ == "__main__":
    main()
