"""Torch-free pieces: the discrete-event simulator and what it shares with the executor (policies, file formats)."""
