"""Command-line interface: ``research <command>``. Each command parses its flags and calls the library."""
