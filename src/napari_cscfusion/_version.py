"""The package version, in a module of its own so that nothing inside the package imports
its root for it."""

__version__ = "0.1.0"
