"""The training library under ``train.py`` and ``finetune.py``: each concern in its own module, the scripts
compose them (torchtitan's ``components/`` beside its ``train.py``).

- ``arguments``: ``TrainArguments`` (train.py's flags) and the checks that run before anything big is built.
- ``precision``: the one ``--mixed_precision auto`` rule (bf16 where the device has it natively).
- ``clock``: ``TrainingClock``, steps and seconds against the budget, and the lr schedule read from it.
- ``optimizers``: AdamW, or Muon for the hidden matrices + AdamW for the rest (``split_parameters``).
- ``data``: text sources → tokenizer → packed blocks → the DataLoader (whose collator draws the objective).
- ``loop``: optimizer steps until the clock is done: accumulation, the non-finite guard, stop requests.
- ``checkpoint``: atomic ``save_state`` checkpoints, ``latest``, and the progress a resume goes on from.
- ``run_log``: ``log.jsonl`` (+ Accelerate trackers), the log window, the loss plot.
- ``evaluation``: held-out perplexity and the end-of-run samples.
- ``run_config``: the resolved configuration every run writes to ``run_config.json``.
- ``stop``: Ctrl-C / SIGTERM turned into a checkpoint at the end of the step.
- ``cli``: bad input ends in one clear line and exit status 2.
"""
