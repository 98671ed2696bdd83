"""The ``quantkit`` command line: ``main.main`` parses and dispatches; each command is a module
with ``configure(parser)`` and ``run(args)``, registered by ``commands`` (a plugin like any other)."""
