"""edgefleet's device package and the home of every shared contract."""

__version__ = "0.1.0"
__all__ = ["__version__"]
