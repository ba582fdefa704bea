"""marvin-compile: MARViN fixed-point training with real low-bit kernels compiled through TVM."""

__version__ = "0.1.0"
