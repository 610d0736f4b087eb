"""Subprocess body of the fault tests: train a tiny toy run in WORKDIR, then write its final state to OUT.

    python tests/fault_driver.py WORKDIR OUT.npz [NUM_STEPS]

``DIFFJAX_TEST_KILL_IN_SAVE=k`` makes the process SIGKILL itself inside its k-th checkpoint save,
after orbax has written every array to the temporary directory and before the atomic rename:
the moment at which a non-atomic writer would leave a half-written checkpoint behind.
"""

import os
import signal
import sys

import jax
import numpy as np

from diffjax.config import load
from diffjax.training.loop import train

TOY2D = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "configs", "toy2d.py")


def tiny_config(num_steps: int):
    c = load(TOY2D)
    c.model.width, c.model.depth = 32, 2
    c.training.batch_size = 32
    c.training.num_steps = num_steps
    c.training.log_every = 2
    c.training.checkpoint_every = 2
    c.training.max_to_keep = 2
    return c


def kill_inside_save(k: int):
    from orbax.checkpoint._src.path import atomicity

    finalize, calls = atomicity.AtomicRenameTemporaryPath.finalize, [0]

    async def killing_finalize(self):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize


if __name__ == "__main__":
    workdir, out = sys.argv[1], sys.argv[2]
    num_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    if os.environ.get("DIFFJAX_TEST_KILL_IN_SAVE"):
        kill_inside_save(int(os.environ["DIFFJAX_TEST_KILL_IN_SAVE"]))
    run, summary = train(tiny_config(num_steps), workdir, progress=False)
    state = jax.device_get(run.state)
    leaves = jax.tree.leaves((state.params, state.ema_params, state.opt_state, state.step, state.key))
    np.savez(out, *[np.asarray(x) for x in leaves])
    print("DONE", summary["start_step"], summary["step"])
