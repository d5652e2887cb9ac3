"""Training: configs, the objective, the sharded train step, checkpoints and the loop."""
