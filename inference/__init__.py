"""Inference: turns the models of :mod:`prob_attention` into fits and posteriors, and saves them."""
