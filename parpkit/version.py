"""parpkit's version, in a module of its own: the package exports it, and the engine keys shared sweep
work on it (work of another version is never reused) without importing the package's top level."""

__version__ = "0.2.1"
