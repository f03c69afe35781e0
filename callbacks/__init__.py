"""Sharpness measures (pure functions in ``measures``) and the Lightning callbacks that run them."""
