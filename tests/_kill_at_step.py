"""Run a job in this process and SIGKILL it right after optimizer step N (0: never). Used by test_resume."""

import os
import signal
import sys

from tiertune.config import load_config
from tiertune.launch.loop import run


def main() -> None:
    kill_at = int(sys.argv[1])

    def kill(row: dict) -> None:
        if row["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as hard as a crash gets

    run(load_config(None, sys.argv[2:]), callbacks=[kill])


if __name__ == "__main__":
    main()
