"""Training: the Learner (one base model, a LoRA adapter per role), its losses, scoring and checkpoints."""
