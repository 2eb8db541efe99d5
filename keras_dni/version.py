"""Version of keras_dni (imports nothing, so `setup.cfg` can read it)."""

__version__ = "0.1.0"
