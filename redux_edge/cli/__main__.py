from redux_edge.cli.main import entry_point

entry_point()
