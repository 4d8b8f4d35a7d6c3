"""Two processes against one on the same global batch, compared with tolerances measured for the purpose.

What is mathematically equal: the global gradient (the mean over the global batch) and therefore the update.
What is not bit-equal: each process runs the UNet on its own slice (batch 1 instead of 2), and BLAS kernels
round differently for different batch sizes, so the gradients agree to float rounding, not bits.

The runs use plain SGD, whose update is linear in the gradient. After AdamW the weights are not comparable:
its first step is about ``lr·sign(g)``, and on the smallest gradients a rounding difference flips the sign
(measured on this kind of machine, AVX-512: AdamW, two DPO steps, 2 processes vs 1 differ by 1.4e-3 ≈ 1.4 lr, the
size of a whole update). The DPO losses also cancel: at step 2 the model/reference error difference is about 1e-3
of the errors, so rounding of 1e-7 in the errors becomes 1e-5 to 1e-4 in the gradient.

Measured on an Intel Xeon (avx512_bf16, no AMX) with its own AVX-512 kernels and with AVX2 kernels forced
(``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``), for DPO (2 steps), KTO (3
steps, lr 0.03), D3PO and DDPO (2 steps), against a deliberately wrong split (gradients not all-reduced, as in
DanceGRPO #110; ``unsynchronised_train.py``):

============================  =====================  =====================  ===========================
quantity                      AVX-512, worst case    AVX2, worst case       wrong split, smallest
============================  =====================  =====================  ===========================
step-1 grad norm, relative    7.4e-7 (D3PO)          5.8e-7 (DDPO)          6.5e-2 (KTO)
later grad norms, relative    1.3e-5 (DDPO)          2.5e-4 (DPO)           1.4e-1 (DDPO)
update error (see below)      8.5e-5 (DPO)           8.1e-5 (DPO)           0.50 (DDPO)
============================  =====================  =====================  ===========================

The tolerances leave a margin of about 12 or more over the worst measurement and stay 20 or more times below the
smallest wrong-split error: ``FIRST_STEP_NORM_RTOL`` 1e-5, ``NORM_RTOL`` 3e-3 (KTO's former per-process
reference point gave 7.7e-3 and 2.2e-2 at steps 2 and 3, so it fails too), ``UPDATE_RTOL`` 1e-3, where the
update error is ``max |one − two| / max |one − init|`` over all LoRA tensors.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
FIRST_STEP_NORM_RTOL = 1e-5
NORM_RTOL = 3e-3
UPDATE_RTOL = 1e-3


def free_port() -> int:
    """A free TCP port for torchrun's rendezvous (a fixed one collides with runs in parallel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(
    args: list[str],
    out: Path,
    processes: int,
    global_batch: int = 2,
    entry=None,
    nodes: int = 1,
    timeout: int = 300,
    accelerate_config: Path | None = None,
    gpu: bool = False,
) -> None:
    """``mmalign train ARGS`` in 1 process or under torchrun in several, each with its share of
    ``global_batch``, asserting that every launcher succeeds (the assertion carries the end of stderr).
    ``entry``: a script to run instead of ``-m mmalign.cli``. ``nodes`` > 1: that many torchrun launchers, as on
    separate machines (``--nnodes``, ``--node_rank``, a rendezvous over loopback), with ``processes`` in all.
    ``accelerate_config``: launched by ``accelerate launch --config_file`` instead of torchrun. The processes see
    no GPU unless ``gpu``."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    if not gpu:  # CPU processes with gloo also on a machine with fewer GPUs than processes
        env["CUDA_VISIBLE_DEVICES"] = ""
    program = list(entry) if entry else ["-m", "mmalign.cli"]
    program += ["train", *args, f"batch_size={global_batch // processes}", f"output_dir={out}"]
    if accelerate_config is not None:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
        launcher += ["--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(free_port())]
        commands = [[*launcher, *program]]
    elif processes == 1:
        commands = [[sys.executable, *program]]
    else:
        assert processes % nodes == 0
        port = free_port()
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes // nodes)]
        launcher += ["--nnodes", str(nodes), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        commands = [[*launcher, "--node_rank", str(rank), *program] for rank in range(nodes)]
    running = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    try:
        finished = [(p.communicate(timeout=timeout), p.returncode) for p in running]
    finally:
        for p in running:
            p.kill()
    for (_, stderr), code in finished:
        # torchrun ends with its own summary: put the processes' tracebacks first
        ranks = [line for line in stderr.splitlines() if line.startswith(("[rank", "mmalign"))]
        assert code == 0, "\n".join(ranks[-40:]) + "\n" + stderr[-2000:]


def train(args: list[str], out: Path, processes: int, global_batch: int = 2, entry=None, nodes: int = 1) -> dict:
    """:func:`run_train`, then the run's ``log.jsonl`` records (``logs``), their ``grad_norm`` list and the LoRA
    tensors. ``processes=0``: one process, this one (no interpreter to start; the same computation)."""
    if processes == 0:
        train_here(args, out, global_batch)
    else:
        run_train(args, out, processes, global_batch, entry, nodes)
    return read_run(out)


def train_here(args: list[str], out: Path, global_batch: int = 2) -> None:
    """``mmalign train ARGS`` in this process (no interpreter to start; the same computation as one process)."""
    from mmalign.commands.train import resolve_trainer_config

    cls, config = resolve_trainer_config(None, [*args, f"batch_size={global_batch}", f"output_dir={out}"])
    cls(config).train()


def read_run(out: Path) -> dict:
    """A finished run's ``log.jsonl`` records (``logs``), their ``grad_norm`` list and the LoRA tensors."""
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {
        "logs": logs,
        "grad_norm": [row["grad_norm"] for row in logs if "grad_norm" in row],  # training rows (not eval/*)
        "weights": load_file(str(out / "pytorch_lora_weights.safetensors")),
    }


def train_one_and_two(args: list[str], tmp_path: Path, global_batch: int = 2) -> dict[str, dict]:
    """The same global batch in one process (this one: no interpreter to start) and in two: ``{"one": run,
    "two": run}`` (see :func:`train`)."""
    return {
        "one": train(args, tmp_path / "one", 0, global_batch),
        "two": train(args, tmp_path / "two", 2, global_batch),
    }


def initial_lora(trainer) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a trainer before training, under the key names of the saved file."""
    from peft.utils import get_peft_model_state_dict

    model = trainer.accelerator.unwrap_model(trainer.model)
    prefix = trainer.policy.lora_layers_key.split("_")[0]  # "unet" or "transformer", as diffusers saves them
    return {f"{prefix}.{k}": v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def update_error(one: dict, two: dict, init: dict) -> float:
    """``max |one − two| / max |one − init|`` over all tensors: the largest disagreement as a fraction of the
    largest update (per tensor it would divide by updates that are themselves rounding-sized)."""
    assert one.keys() == two.keys() == init.keys()
    update = max(float((one[k] - init[k]).abs().max()) for k in one)
    assert update > 0, "nothing was trained"
    return max(float((one[k] - two[k]).abs().max()) for k in one) / update


def assert_two_processes_equal_one(runs: dict, init: dict) -> None:
    one, two = runs["one"], runs["two"]
    assert len(one["grad_norm"]) == len(two["grad_norm"]) >= 2 and one["grad_norm"][-1] > 0
    first = abs(one["grad_norm"][0] - two["grad_norm"][0]) / one["grad_norm"][0]
    assert first <= FIRST_STEP_NORM_RTOL, (one["grad_norm"], two["grad_norm"])
    for a, b in zip(one["grad_norm"][1:], two["grad_norm"][1:]):
        assert abs(a - b) <= NORM_RTOL * a, (one["grad_norm"], two["grad_norm"])
    error = update_error(one["weights"], two["weights"], init)
    assert error <= UPDATE_RTOL, f"updates differ by {error:.2e} of their size"
