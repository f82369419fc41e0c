"""Two nodes simulated on one machine: two ``torchrun`` launchers, one process each, meeting
on localhost, finish an unlearning run as one job (docs/distributed.md, torchrun)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlearning_runs import subprocess_env, tiny_job
from vdu_lightning.checkpoints import read_unet_weights

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_nodes_finish_an_unlearning_run(tmp_path: Path) -> None:
    probe = {"class_path": "probes.RankProbe", "init_args": {"out_dir": "probe"}}
    export = {"class_path": "vdu_lightning.callbacks.ExportPretrained",
              "init_args": {"dirpath": "unlearned"}}
    config = tiny_job(tmp_path, max_steps=4, callbacks=[probe, export],
                      trainer={"num_nodes": 2, "devices": 1, "strategy": "ddp"})
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
             f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
             "-m", "vdu_lightning", "fit", "--config", str(config)],
            cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{output[-4000:]}"

    ranks = [torch.load(tmp_path / "probe" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [4, 4]
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
    exported = read_unet_weights(tmp_path / "unlearned")
    assert torch.equal(exported["conv_in.weight"], ranks[0]["weights"]["conv_in.weight"])
    assert not torch.equal(exported["conv_in.weight"],
                           read_unet_weights(tmp_path / "ddpm")["conv_in.weight"])
