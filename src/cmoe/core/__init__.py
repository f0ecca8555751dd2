"""The method: one config type per method and the preset table (config.py, presets.py), the layout a budget gives
(layout.py), the layer-by-layer calibration loop (calibration.py), each method's builder (experts.py, sparse.py)
and their steps (activations, grouping, router fitting), and `carve_`, which turns each dense FFN into a carved
one (carve.py)."""
