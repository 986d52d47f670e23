"""Training / evaluation jobs behind the ``emamba`` subcommands (each module exposes ``main(argv) -> int``)."""
