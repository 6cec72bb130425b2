"""Data-parallel training: ``torchrun --nproc_per_node 2`` on the CPU (gloo) matches one process."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from glide_text2im.train.cli import build_trainer, make_parser
from glide_text2im.train.trainer import DistributedContext, read_state
from tests.train import TINY_CLIP_OPTIONS, TINY_UNET_OPTIONS, option_args, single_thread, write_image_folder

STEPS = 3

# Runs each training command (the CLI's parser and trainer) in every torchrun process, then
# saves that rank's final weights as rank<R>.pt beside the run's own files.
HARNESS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from glide_text2im.train.cli import build_trainer, make_parser
    from glide_text2im.train.trainer import init_distributed

    torch.set_num_threads(1)
    for argv in json.loads(sys.argv[1]):
        args = make_parser().parse_args(argv)
        context = init_distributed(args.device)
        trainer = build_trainer(args, context)
        trainer.train()
        torch.save(trainer.task.model.state_dict(), Path(args.out) / f"rank{context.rank}.pt")
    dist.destroy_process_group()
    """
)


def command(task: str, data: Path, out: Path) -> list:
    # 64 channels: with 32, every GroupNorm has one channel per group, so the conv biases in
    # front of them cannot change the output; their exact gradient is 0 and Adam turns the
    # rounding noise in it into +-lr steps whose direction depends on the summation order.
    options = TINY_CLIP_OPTIONS if task == "clip" else dict(TINY_UNET_OPTIONS, num_channels=64)
    return [
        task, "--data", str(data), "--out", str(out), "--steps", str(STEPS), "--batch-size", "4",
        "--lr", "1e-3", "--log-every", "1", "--num-workers", "0", "--device", "cpu", "--uncond-prob", "0.5",
        *option_args(options),
    ]  # fmt: skip


def test_torchrun_two_processes_match_single_process_training(tmp_path):
    data = write_image_folder(tmp_path / "data")
    commands = {task: command(task, data, tmp_path / f"ddp_{task}") for task in ("base", "clip")}
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(harness), json.dumps(list(commands.values()))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for task, argv in commands.items():
        ddp_out = tmp_path / f"ddp_{task}"
        rank0 = torch.load(ddp_out / "rank0.pt", weights_only=True)
        rank1 = torch.load(ddp_out / "rank1.pt", weights_only=True)
        state = read_state(ddp_out)
        assert state["step"] == STEPS and len(state["rng"]) == 2
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (task, key)
            assert torch.equal(rank0[key], state["model"][key]), (task, key)

        single_argv = list(argv)
        single_argv[single_argv.index("--out") + 1] = str(tmp_path / f"single_{task}")
        with single_thread():
            trainer = build_trainer(make_parser().parse_args(single_argv), DistributedContext())
            batch = next(trainer.batches())
            initial = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
            trainer.train()
            single = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
            single_losses = trainer.evaluate(batch)
            trainer.task.model.load_state_dict(rank0)
            ddp_losses = trainer.evaluate(batch)
        # Adam divides each gradient by its running RMS, so rounding differences in small
        # gradients (summed in another order across two processes) reach up to about 1e-4 of
        # a weight; the weights themselves move by about lr * steps = 3e-3.
        assert max((single[k] - initial[k]).abs().max().item() for k in single) > 2e-3
        for key in single:
            torch.testing.assert_close(rank0[key], single[key], atol=1e-4, rtol=1e-4, msg=f"{task} {key}")
        for name, value in single_losses.items():
            assert abs(ddp_losses[name] - value) <= 1e-5 * max(1.0, abs(value)), (task, name)

        with open(ddp_out / "log.csv", newline="") as f:
            ddp_rows = list(csv.DictReader(f))
        with open(tmp_path / f"single_{task}" / "log.csv", newline="") as f:
            single_rows = list(csv.DictReader(f))
        assert [int(row["step"]) for row in ddp_rows] == list(range(1, STEPS + 1))
        for ddp_row, single_row in zip(ddp_rows, single_rows):
            assert abs(float(ddp_row["loss"]) - float(single_row["loss"])) <= 1e-4 * max(1.0, float(single_row["loss"]))
