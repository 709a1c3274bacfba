"""The ``atajo`` command line."""
