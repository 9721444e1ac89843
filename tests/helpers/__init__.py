"""Test helpers: multi-rank runs on CPU (ranks), small models and media made on the spot (fixtures)."""
