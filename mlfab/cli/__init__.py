"""The command line (internal): one grammar for `python -m my.task ...`, `Task.launch` and the `mlfab` script."""
