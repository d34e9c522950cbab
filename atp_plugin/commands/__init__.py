"""Sub-commands of the ``atp`` command line."""
