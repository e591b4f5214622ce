"""snce: Stochastic Neighbor Cross-Entropy for discrete image generators over very large VQ codebooks."""

__version__ = "0.1.0"
