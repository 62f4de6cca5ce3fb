"""What train.py and eval.py run on: config, runtime, checkpoints, the optimisation step, one epoch, evaluation,
metrics, plots, and the user-error exit. Nothing here imports an entry script."""
