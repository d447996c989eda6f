"""virtualcell: train, evaluate and register a simulator of cell-state dynamics."""

__version__ = "0.1.0"
