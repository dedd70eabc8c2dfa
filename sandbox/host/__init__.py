"""The host side of the sandbox: what runs in the caller's process and starts the jails.

`pool` (SandboxPool: queueing, retries, worker replacement), `worker` (one template process and its control
socket), `launch` (the bwrap/plain argv and the jail's mount layout), `launcher` (the first process of a
worker, run as a script before the jail exists: cgroup join, staging binds, uid drop) and `cgroups` (the
per-worker memory/pids/cpu slots). Nothing here is imported inside the jail.
"""
