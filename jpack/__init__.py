"""jpack: exact, fast attention for packed sequences in JAX.

Import what you use: `import jpack.attention`. Importing jpack loads no torch,
grain or plotting library.
"""

__version__ = "0.1.0"
