"""mmsoup: manifold mixing model soups (Fassold 2023) and model soups (Wortsman et al. 2022)."""

from mmsoup import isa as _isa

_isa.apply()  # before torch or numpy start: one instruction-set level for the numbers (mmsoup.isa)

__version__ = "0.1.0"
