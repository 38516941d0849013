"""Training adapters with REINFORCE: config, setup, rollouts, loss, trainer, checkpoints, sweeps."""
