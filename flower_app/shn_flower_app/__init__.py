"""Flower entry points of shn; everything lives in the installed ``shn.flower.engine``."""
