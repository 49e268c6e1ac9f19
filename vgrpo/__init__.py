"""vgrpo: online RL (V-GRPO and baselines) for text-to-image flow-matching models on Ray."""

__version__ = "0.1.0"
