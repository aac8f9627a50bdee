"""The command line: ``splitnn`` (main.py) and one module per command, with the options they share."""
