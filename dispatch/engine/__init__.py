"""The assignment engine's background loops: assigner, reaper, pruner and directory sync."""
