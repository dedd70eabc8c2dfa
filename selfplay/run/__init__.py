"""Run control: the driver, one iteration's steps, the Ray actors, the run directory, cluster jobs."""
