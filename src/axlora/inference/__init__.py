"""``axlora inference``: talk to a trained run's model in the format it was trained on (a command module)."""
