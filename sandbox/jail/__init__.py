"""The jail side of the sandbox: what runs inside a worker's jail, in the template and each call.

`zygote` (the template: imports, self-checks, serves calls), `monitor` (one call: fork, wait, collect),
`reaper` (the call's pid namespace init and stray-process sweep), `snippet` (the forked child: confinement,
then the user's code), `landlock` and `seccomp` (the filters the snippet installs). Standard library plus
`sandbox.linux`/`sandbox.protocol` only; nothing here imports the host side (the template must stay lean).
"""
