"""mmsoup: manifold mixing model soups (Fassold 2023) and model soups (Wortsman et al. 2022)."""

__version__ = "0.1.0"
