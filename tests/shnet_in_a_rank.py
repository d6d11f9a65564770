"""``shnet ARGS`` in this process, as ``python -m shnet`` runs it but without automatic garbage
collection, then a failure (exit 3) if gloo's threads outlive the command. Launched under torchrun
by tests/test_trainer_distributed.py: ``shnet train`` must free its process group itself, before
the interpreter's teardown (where gloo's threads can abort a finished run)."""

from __future__ import annotations

import gc
import sys

from distributed_step import gloo_threads

from shnet.cli import main

if __name__ == "__main__":
    gc.disable()  # what the command leaves to a collection is collected by the command itself, or never
    main(sys.argv[1:], prog_name="shnet", standalone_mode=False)
    left = gloo_threads()
    if left:
        print(f"the process group's threads outlive `shnet {' '.join(sys.argv[1:])}`: {left}", file=sys.stderr)
        sys.exit(3)
