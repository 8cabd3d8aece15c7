"""baddiff_core: the library behind the book."""

__version__ = "0.1.0"
