"""Losses (pure functions), objectives, reference modes, the training loop, metric names, guards and
generation at eval."""
