"""Run train.py with the loss of one training micro-batch made NaN: the fault injection of
tests/test_reliability.py, kept out of the training loop (the loop has no test hook).

    python -m tests.inject_nan N train.py [train.py's arguments ...]

The ``N``-th forward pass in training mode (micro-batch ``N``: evaluation runs in eval mode) returns a NaN
loss, as a diverged step would; train.py then runs as ``__main__`` in this process, exit status and all.
"""

import functools
import runpy
import sys

from bilingual_glm import BilingualGlmForCausalLM


def patch_forward(nan_at: int) -> None:
    forward, calls = BilingualGlmForCausalLM.forward, [0]

    @functools.wraps(forward)  # generate() reads forward's signature
    def nan_forward(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == nan_at:
                output.loss = output.loss * float("nan")
        return output

    BilingualGlmForCausalLM.forward = nan_forward


if __name__ == "__main__":
    patch_forward(int(sys.argv[1]))
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
