"""Subcommands of the ``rwkvunet`` command; each module has ``add_arguments(parser)`` and ``run(args)``."""
