"""What a run accumulates and must survive a crash: the replay buffer and the task pool."""
