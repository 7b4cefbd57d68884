"""The ``pgzoo`` command line: ``main`` dispatches, one module per subcommand (argparse lives here only)."""
