"""Offline jobs on Lightning: training expert LoRAs, training the generator, evaluation against baselines."""
