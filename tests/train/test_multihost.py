"""A real two-process run: `jax.distributed` with a localhost coordinator, CPU (gloo) collectives.

Two processes with two fake CPU devices each train the smoke config in one shared
workdir, are stopped at step 6 and started again. The result must equal one process
with four devices; only process 0 writes metrics, and it writes one record per logged step.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "experiments.pretrain", "--config", "configs/llama.py:smoke",
           "--config.analysis.grad_rank=False"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir: pathlib.Path, devices: int, *, process_id: int | None = None, port: int | None = None,
           stop_at: int | None = None) -> subprocess.Popen:
    """The smoke main job in a fresh process with `devices` CPU devices (and a coordinator at `port`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env.update(XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    if process_id is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(process_id))
    args = COMMAND + ["--workdir", str(workdir)] + ([f"--stop_at={stop_at}"] if stop_at else [])
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append(out)
        assert proc.returncode == 0, out[-4000:]
    return outputs


def two_processes(workdir: pathlib.Path, stop_at: int | None = None) -> list[subprocess.Popen]:
    port = free_port()
    return [launch(workdir, 2, process_id=i, port=port, stop_at=stop_at) for i in range(2)]


def records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices_and_resume(tmp_path):
    shared, reference = tmp_path / "shared", tmp_path / "reference"
    first = finish(two_processes(shared, stop_at=6) + [launch(reference, 4)])
    assert "resumed" not in first[0]
    second = finish(two_processes(shared))
    assert "resumed from" in second[0] and "at step 6" in second[0]
    assert second[1].count("step 12/12") == 0  # process 1 prints no progress line

    got, want = records(shared), records(reference)
    steps = [r["step"] for r in got]
    assert steps == [r["step"] for r in want] and len(steps) == len(set(steps))  # one record per logged step
    assert got[-1]["eval_loss"] == pytest.approx(want[-1]["eval_loss"], rel=1e-5)
    assert [r["loss"] for r in got if "loss" in r] == pytest.approx([r["loss"] for r in want if "loss" in r],
                                                                     rel=1e-5)
    assert sorted(p.name for p in (shared / "checkpoints").iterdir()) == ["12", "6"]
    assert (shared / "config.json").is_file() and (shared / "loss.png").is_file()
