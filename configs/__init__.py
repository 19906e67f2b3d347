"""Experiment configs: plain `get_config()` files returning an `ml_collections.ConfigDict`."""
