"""crop-clusterd: group camera-trap arthropod crops into individuals."""

__version__ = "0.1.0"
