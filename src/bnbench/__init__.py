"""bnbench: what batch normalization buys a network, measured."""
__version__ = "0.1.0"
