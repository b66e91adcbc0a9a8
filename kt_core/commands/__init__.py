"""One module per ``kt`` verb: ``HELP``, ``USAGE``, optional ``FLAGS``, ``run(overrides, flags)``."""
