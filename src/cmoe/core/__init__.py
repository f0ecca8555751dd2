"""The method: CarveConfig, the layer-by-layer calibration loop, FFN activations, neuron grouping, router
fitting, and `carve_`, which turns each dense FFN into an MoE FFN."""
