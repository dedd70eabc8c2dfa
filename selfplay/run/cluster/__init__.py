"""What runs where: the Ray actor shells (`actors.py`), their placement on CPUs/GPUs/nodes (`placement.py`),
the rollout replicas behind the router (`fleet.py`) and the learner ranks as one handle (`ranks.py`).

The driver (selfplay/run/driver.py) owns a run; this package owns the processes it talks to."""
