"""Reward worker process (started by `batch.grade_batch`): `python -m nemocascade.rewards.worker
REQ_FD REPLY_FD`. Receives pickled (index, record, response, finished, thinking) on REQ_FD,
answers pickled (index, score, details, error kind or None) on REPLY_FD; None or EOF ends it.
Stray prints go to stderr."""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection

from nemocascade.rewards.batch import _safe_score


def main(argv: list[str]) -> None:
    os.dup2(2, 1)
    rx = Connection(int(argv[0]), writable=False)
    tx = Connection(int(argv[1]), readable=False)
    while True:
        try:
            msg = rx.recv()
        except EOFError:
            return
        if msg is None:
            return
        i, record, response, finished, thinking = msg
        tx.send((i, *_safe_score(record, response, finished, thinking)))


if __name__ == "__main__":
    main(sys.argv[1:])
