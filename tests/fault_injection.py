"""train_net.py with a fault injected, for the resume tests.

    python tests/fault_injection.py [--trace DIR] [--kill-at-step N | --kill-at-epoch-start E
        | --kill-in-save K | --signal-at-step N [--signal USR1]] -- TRAIN_NET_ARGS...

--trace DIR             every rank appends (step, epoch, image ids) of each trained batch to
                        DIR/trace_rank<r>.jsonl
--kill-at-step N        SIGKILL every rank when training step N (1-based) is about to start
--kill-at-epoch-start E SIGKILL every rank when epoch E (0-based) starts, after the previous
                        epoch's checkpoint
--kill-in-save K        SIGKILL the writing rank in the middle of writing its K-th checkpoint
                        (a partial temporary file is left behind)
--signal-at-step N      send --signal (TERM, the default, or USR1) to rank --signal-rank
                        (default 0) when step N is about to start (as `docker stop` or
                        SLURM's `--signal` do)

Lightning starts the other DDP processes by running this same command line, so they get
the same faults.
"""

import argparse
import json
import os
import signal
import sys

import pytorch_lightning as pl

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from alrp_d2.engine import checkpoint as checkpoint_module
from alrp_d2.engine import launch
from alrp_d2.engine import trainer as trainer_module
from alrp_d2.io import atomic_write


class Faults(pl.Callback):
    def __init__(self, opts):
        self.opts = opts

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step + 1
        if self.opts.trace:
            path = os.path.join(self.opts.trace, f"trace_rank{trainer.global_rank}.jsonl")
            with open(path, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "epoch": trainer.current_epoch,
                            "ids": [d["image_id"] for d in batch],
                        }
                    )
                    + "\n"
                )
        if self.opts.kill_at_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.opts.signal_at_step == step and trainer.global_rank == self.opts.signal_rank:
            os.kill(os.getpid(), getattr(signal, "SIG" + self.opts.signal))

    def on_train_epoch_start(self, trainer, pl_module):
        if self.opts.kill_at_epoch_start == trainer.current_epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-at-epoch-start", type=int)
    parser.add_argument("--kill-in-save", type=int)
    parser.add_argument("--signal-at-step", type=int)
    parser.add_argument("--signal", default="TERM", choices=["TERM", "USR1"])
    parser.add_argument("--signal-rank", type=int, default=0)
    split = sys.argv.index("--")
    opts = parser.parse_args(sys.argv[1:split])
    if opts.trace:
        os.makedirs(opts.trace, exist_ok=True)

    build = trainer_module.build_trainer

    def build_with_faults(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.insert(0, Faults(opts))
        return trainer

    launch.build_trainer = build_with_faults

    if opts.kill_in_save:
        save = checkpoint_module.AtomicCheckpointIO.save_checkpoint
        calls = {"n": 0}

        def dying_save(self, checkpoint, path, storage_options=None):
            calls["n"] += 1
            if calls["n"] == opts.kill_in_save:
                with atomic_write(path, "wb") as f:
                    f.write(b"PK\x03\x04 half a checkpoint")
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            return save(self, checkpoint, path, storage_options)

        checkpoint_module.AtomicCheckpointIO.save_checkpoint = dying_save

    sys.exit(launch.main(sys.argv[split + 1 :]))


if __name__ == "__main__":
    main()
