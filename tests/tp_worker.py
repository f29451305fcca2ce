"""Worker of ``test_citizen.test_tp_plan_auto_shards_ours_and_native_alike``, run as
``torchrun --nproc_per_node 2 tests/tp_worker.py OURS_DIR NATIVE_DIR OUT.pt`` (gloo on CPU).

Loads our folder and its native ``glm`` conversion with ``tp_plan="auto"`` and saves, from rank 0, both
models' logits and greedy tokens and the rows of rank 0's q_proj shard (half the heads when sharded)."""

import sys

import torch
import torch.distributed as dist
from transformers import DistributedConfig, GlmForCausalLM

from bilingual_glm import BilingualGlmForCausalLM

ours_dir, native_dir, out = sys.argv[1:4]
results = {}
for name, model_class, folder in (
    ("ours", BilingualGlmForCausalLM, ours_dir),
    ("native", GlmForCausalLM, native_dir),
):
    model = model_class.from_pretrained(folder, distributed_config=DistributedConfig(tp_plan="auto")).eval()
    ids = torch.randint(11, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    weight = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        results[name] = {
            "logits": model(ids).logits,
            "greedy": model.generate(ids[:, :5], max_new_tokens=5, do_sample=False),
            "q_rows": (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0],
        }
if dist.get_rank() == 0:
    torch.save(results, out)
dist.barrier()
dist.destroy_process_group()
