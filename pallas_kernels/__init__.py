"""Pallas kernels used by jpack. Kernels know nothing of Flax or packing."""
