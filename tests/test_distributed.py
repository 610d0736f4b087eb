"""Multi-host start-up, the local launcher, and faults: SIGKILL at any moment, SIGTERM, a dead peer.

Multi-process runs use ``launch/local.sh`` (jax.distributed over 127.0.0.1, gloo collectives);
the single-process fault runs use ``tests/fault_driver.py`` in a subprocess.
"""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diffjax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "local.sh")
DRIVER = os.path.join(REPO, "tests", "fault_driver.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
ENV.pop("XLA_FLAGS", None)

# a tiny toy run for the main job: MLP on the ring mixture, every phase of the job exercised
TOY_ARGS = ["--config", os.path.join(REPO, "experiments", "configs", "toy2d.py"), "--noprogress",
            "--config.model.width=32", "--config.model.depth=2", "--config.training.batch_size=32",
            "--config.training.log_every=2", "--config.training.checkpoint_every=4",
            "--config.sample.num_samples=33", "--config.sample.num_steps=4",
            "--config.eval.num_examples=32", "--config.eval.batch_size=32"]


# ---- detection of the process layout (pure) ----------------------------------------------------


def test_detect_single_process_by_default():
    assert distributed.detect(env={}) is None
    assert distributed.detect(env={"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}) is None
    assert distributed.detect(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) is None  # batch script, not srun


def test_detect_sources_in_order():
    flags = distributed.detect("10.0.0.1:1234", 4, 3, env={"DIFFJAX_COORDINATOR_ADDRESS": "x:1"})
    assert flags == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3, "source": "flags"}
    env = {"DIFFJAX_COORDINATOR_ADDRESS": "127.0.0.1:5", "DIFFJAX_NUM_PROCESSES": "2", "DIFFJAX_PROCESS_ID": "1",
           "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "8"}
    assert distributed.detect(env=env)["source"] == "env"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "8"}
    assert distributed.detect(env=slurm) == {
        "cluster_detection_method": "slurm", "source": "slurm"}
    assert distributed.detect(env={"DIFFJAX_DISTRIBUTED": "auto"}) == {"source": "auto"}


@pytest.mark.parametrize("args, env, match", [
    (("127.0.0.1:5", 2, None), {}, "missing: \\['process_id'\\]"),
    (("127.0.0.1:5", 2, 2), {}, "process_id must lie in \\[0, 2\\)"),
    (("localhost", 2, 0), {}, "coordinator_address must be host:port"),
    ((None, None, None), {"DIFFJAX_COORDINATOR_ADDRESS": "h:1", "DIFFJAX_NUM_PROCESSES": "two",
                          "DIFFJAX_PROCESS_ID": "0"}, "DIFFJAX_NUM_PROCESSES must be an integer"),
])
def test_detect_rejects_bad_layouts_by_name(args, env, match):
    with pytest.raises(ValueError, match=match):
        distributed.detect(*args, env=env)


def test_launcher_rejects_a_bad_process_count():
    res = subprocess.run([LAUNCH, "two", "--workdir", "/nonexistent"], capture_output=True, text=True, env=ENV)
    assert res.returncode == 2 and "NUM_PROCESSES" in res.stderr


# ---- two processes over loopback ---------------------------------------------------------------


def _history(workdir):
    with open(os.path.join(workdir, "loss_history.csv")) as f:
        rows = list(csv.DictReader(f))
    return np.array([[int(r["step"]), float(r["loss"]), float(r["grad_norm"])] for r in rows])


def test_two_processes_match_one_process(tmp_path):
    """launch/local.sh 2: the same loss trajectory as one process, evaluation gathered on every host."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    steps = ["--config.training.num_steps=8"]
    subprocess.run([sys.executable, "-m", "diffjax.main", "--workdir", one, *TOY_ARGS, *steps], check=True,
                   cwd=REPO, env=ENV, capture_output=True, timeout=600)
    res = subprocess.run([LAUNCH, "2", "--workdir", two, *TOY_ARGS, *steps], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = os.listdir(os.path.join(two, "logs"))
    assert sorted(logs) == ["process_0.log", "process_1.log"]
    with open(os.path.join(two, "logs", "process_1.log")) as f:
        assert "process 1 of 2" in f.read()
    h1, h2 = _history(one), _history(two)
    assert h1.shape == h2.shape == (8, 3)
    np.testing.assert_array_equal(h1[:, 0], h2[:, 0])
    np.testing.assert_allclose(h2[:, 1:], h1[:, 1:], rtol=1e-5)  # the batch mean is reduced in another order
    import json

    with open(os.path.join(two, "metrics.json")) as f:
        m = json.load(f)
    assert m["num_processes"] == 2 and m["num_devices"] == 2 and m["nll_examples"] == 32
    assert np.isfinite(m["test_nats_per_dim"])


def _wait_for(predicate, timeout, proc=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _launcher_pids(proc_stderr_path):
    with open(proc_stderr_path) as f:
        for line in f:
            if "pids" in line:
                return [int(p) for p in line.split("(pids ")[1].split(")")[0].split()]
    return None


def test_a_dead_peer_stops_the_other_process(tmp_path):
    """SIGKILL one of two processes mid-training: the other exits with a clear error, the launcher fails."""
    workdir = str(tmp_path / "run")
    err = str(tmp_path / "launcher.err")
    with open(err, "w") as f:
        proc = subprocess.Popen([LAUNCH, "2", "--workdir", workdir, *TOY_ARGS, "--config.training.num_steps=100000",
                                 "--config.training.checkpoint_every=1000",
                                 "--config.distributed.heartbeat_timeout_seconds=10"],
                                cwd=REPO, env=dict(ENV, DIFFJAX_FAIL_GRACE="120"), stdout=subprocess.DEVNULL,
                                stderr=f)
    try:
        history = os.path.join(workdir, "loss_history.csv")
        assert _wait_for(lambda: os.path.exists(history) and os.path.getsize(history) > 200, 300, proc)
        pids = _launcher_pids(err)
        os.kill(pids[1], signal.SIGKILL)
        t_kill = time.monotonic()
        rc = proc.wait(timeout=120)  # the survivor must not hang; the launcher's own kill comes only at 120 s
        elapsed = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0
    assert elapsed < 60, elapsed  # gloo sees the reset connection at once; heartbeats bound it at 10 s
    with open(os.path.join(workdir, "logs", "process_0.log")) as f:
        log = f.read()
    assert "process 0 of 2 failed; the run stops" in log, log[-3000:]
    with open(err) as f:
        assert "process 1 exited with status 137" in f.read()


def test_sigterm_checkpoints_every_process_at_the_same_step(tmp_path):
    """SIGTERM to the launcher reaches both processes; they agree on a step, checkpoint it and exit 143."""
    workdir = str(tmp_path / "run")
    err = str(tmp_path / "launcher.err")
    with open(err, "w") as f:
        proc = subprocess.Popen([LAUNCH, "2", "--workdir", workdir, *TOY_ARGS, "--config.training.num_steps=100000",
                                 "--config.training.checkpoint_every=1000"],
                                cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=f)
    try:
        history = os.path.join(workdir, "loss_history.csv")
        assert _wait_for(lambda: os.path.exists(history) and os.path.getsize(history) > 200, 300, proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 143, open(err).read()[-3000:]
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps and steps[-1] % 1000 != 0  # a pre-emption checkpoint, not a periodic one
    for i in range(2):
        with open(os.path.join(workdir, "logs", f"process_{i}.log")) as f:
            assert f"SIGTERM: checkpointed step {steps[-1]}" in f.read()


# ---- SIGKILL at arbitrary moments, one process -------------------------------------------------


def _driver(workdir, out, env=None, **popen):
    return subprocess.Popen([sys.executable, DRIVER, workdir, out, "24"], cwd=REPO, env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _load(path):
    with np.load(path) as z:
        return [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]


def test_sigkill_at_random_moments_resumes_bitwise(tmp_path):
    """Kill training with SIGKILL inside a checkpoint save and at random times; the resumed run's
    parameters, EMA, optimizer state and loss history equal the uninterrupted run's bit for bit."""
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = _driver(ref_dir, str(tmp_path / "ref.npz"))
    # a kill between orbax writing the arrays and the atomic rename: no half-written checkpoint may load
    p = _driver(run_dir, str(tmp_path / "never.npz"), env={"DIFFJAX_TEST_KILL_IN_SAVE": "3"})
    assert p.wait(timeout=600) == -signal.SIGKILL
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]
    rng = np.random.default_rng(0)
    for delay in rng.uniform(3.0, 12.0, size=3):  # start-up, compilation, training and saves all take turns
        p = _driver(run_dir, str(tmp_path / "partial.npz"))
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    final = _driver(run_dir, str(tmp_path / "final.npz"))
    out, errs = final.communicate(timeout=600)
    assert final.returncode == 0, errs[-3000:]
    a, b = _load(str(tmp_path / "ref.npz")), _load(str(tmp_path / "final.npz"))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(_history(ref_dir), _history(run_dir))  # every step logged once


def test_sigterm_single_process_checkpoints_and_exits_143(tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "diffjax.main", "--workdir", workdir, *TOY_ARGS,
                             "--config.training.num_steps=100000", "--config.training.checkpoint_every=1000"],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        history = os.path.join(workdir, "loss_history.csv")
        assert _wait_for(lambda: os.path.exists(history) and os.path.getsize(history) > 200, 300, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps and f"SIGTERM: checkpointed step {steps[-1]}" in err
