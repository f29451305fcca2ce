"""LoRA-finetune a model folder on a few chats, save the adapter, merge it into a full model folder.

    python examples/lora_finetune.py runs/train-mini --output_dir runs/lora-demo
    python examples/lora_finetune.py runs/train-mini --chats my_chats.jsonl --max_steps 200

One screen of what ``finetune.py --task sft --lora_r 8 --merge_lora`` does: LoRA on the standard module
names (q/k/v/o projections and the fused MLP), loss only on assistant tokens (the chat template's
``{% generation %}`` blocks), ``Trainer`` for the loop. Writes ``OUTPUT/adapter`` (PEFT adapter) and
``OUTPUT/merged`` (a full model folder that loads with ``trust_remote_code=True``).
"""

import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

DEMO_CHATS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "user", "content": "一加一等于几？"}, {"role": "assistant", "content": "一加一等于二。"}],
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
]


def encode(messages: list[dict], tokenizer) -> dict:
    rendered = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    labels = [
        t if keep else -100
        for t, keep in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True)
    ]
    return {
        "input_ids": rendered["input_ids"],
        "attention_mask": rendered["attention_mask"],
        "labels": labels,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Pretrained model folder or Hub id.")
    parser.add_argument(
        "--chats", type=Path, help='JSONL, one {"messages": [...]} per line (default: 4 demo chats).'
    )
    parser.add_argument("--output_dir", default="runs/lora-demo")
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--lora_r", type=int, default=8)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True)
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    chats = DEMO_CHATS
    if args.chats:
        chats = [
            json.loads(line)["messages"]
            for line in args.chats.read_text(encoding="utf-8").splitlines()
            if line
        ]
    train = [encode(messages, tokenizer) for messages in chats]
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=4,
            learning_rate=2e-3,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
        ),
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),  # pads labels with -100
    )
    trainer.train()

    output = Path(args.output_dir)
    model.save_pretrained(output / "adapter")  # adapter_config.json + adapter_model.safetensors
    merged = model.merge_and_unload()  # LoRA folded into the weights: a plain model again
    merged.save_pretrained(output / "merged")
    tokenizer.save_pretrained(output / "merged")

    prompt = tokenizer.apply_chat_template(
        chats[0][:1], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        answer = merged.generate(**prompt, max_new_tokens=16, do_sample=False)
    print(
        "merged model answers:",
        repr(tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)),
    )
    print(f"adapter: {output / 'adapter'}\nmerged model: {output / 'merged'}")


if __name__ == "__main__":
    main()
