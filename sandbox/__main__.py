"""`python -m sandbox doctor [--json] [--min-isolation LEVEL]`: see sandbox/doctor.py."""
import sys

from sandbox.doctor import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "doctor":
        print("usage: python -m sandbox doctor [--json] [--min-isolation {rlimits,namespaces,full}]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(args[1:]))
