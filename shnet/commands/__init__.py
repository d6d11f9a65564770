"""Click commands that join layers (each module registers in ``shnet.cli`` with one import)."""
