"""Pretraining: the driver, config, run directory and stages of the discoattr pipeline."""
