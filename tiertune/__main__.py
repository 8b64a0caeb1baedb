"""``python -m tiertune``: the same CLI as the ``tiertune`` console script."""

from tiertune.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
