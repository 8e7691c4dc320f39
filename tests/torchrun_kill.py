"""`flipscope eval` under torchrun with one rank killed mid-run (for tests/test_shard.py only).

``python -m torch.distributed.run ... tests/torchrun_kill.py KILL_RANK AFTER eval ...``: rank KILL_RANK
writes AFTER batches to its shard, then dies at once (``os._exit``: no cleanup, like a kill -9 or an
out-of-memory kill); torchrun then stops the other ranks.
"""

from __future__ import annotations

import os
import sys

import torch

from analyses.cli import main
from analyses.eval import predictions

torch.set_num_threads(1)
kill_rank, after, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
if int(os.environ["RANK"]) == kill_rank:
    written = {"batches": 0}
    add_batch = predictions._Appender.add_batch

    def add_then_die(self: predictions._Appender, lines: list[str]) -> None:
        add_batch(self, lines)
        written["batches"] += 1
        if written["batches"] >= after:
            self.flush(sync=True)
            os._exit(9)

    predictions._Appender.add_batch = add_then_die  # type: ignore[method-assign]
sys.exit(main(argv))
