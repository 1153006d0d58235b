"""``python -m pretrain.torchrun ARGS``: torchrun (``python -m torch.distributed.run ARGS``, same
arguments) for ``launch/torchrun.sh`` and ``launch/slurm.sbatch``, ending a Ctrl-C or SIGTERM in one line.

On a signal torchrun forwards it to the ranks, which save at the end of their step and say so (see
:mod:`pretrain.train`), and then re-raises it as ``SignalException``: a 30-line traceback after an
orderly stop, which reads like a crash. Here it becomes one line and the shell's exit status for that
signal (128 + its number). A rank that fails still gets torchrun's own report, unchanged.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun_main


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as err:
        name = signal.Signals(err.sigval).name
        print(f"torchrun: stopped by {name}; the ranks' last lines say what they saved (rerun the same command to resume)",
              file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
