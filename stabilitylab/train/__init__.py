"""The training harness: loop, schedules, optimiser, precision and checkpoints."""
