"""``python -m fedlora.tasks.shakespeare [SOURCE]``: print what the parser finds, as JSON."""

from fedlora.tasks.shakespeare.plays import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
