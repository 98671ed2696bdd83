"""quantkit's built-in backends: one package each, registered through the same hook a third party uses."""
