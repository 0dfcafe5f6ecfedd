"""The front door: attention functions, the layer, sharding helpers, compiled calls,
CUDA-graph capture and ``strategy="auto"``."""
