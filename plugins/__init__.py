"""parpkit's built-in plugins. Each module is registered through the ``parpkit`` entry-point group
in pyproject.toml, exactly as a third-party package registers its own."""
