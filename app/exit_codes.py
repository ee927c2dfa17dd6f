"""Exit codes of the `pocketlm` command."""

OK = 0
ERROR = 1  # a PocketError: the message says what is wrong and what to do
USAGE = 2  # click's own code for bad arguments
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
