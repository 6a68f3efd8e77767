"""Training under ``torchrun``: real 2-process jobs on the CPU (Gloo) against one-process runs.

Every job here is a real ``python -m torch.distributed.run --standalone --nproc_per_node=2`` launch of the
ftsgd CLI (through ``tests/_fault_driver.py`` where a test needs to see steps and writes, or to make a
rank fail). The dataset is sized so that the last training batch leaves rank 0 without images and the
evaluation splits do not divide evenly: the paths where a process has nothing to do are always taken.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _zygote as zygote
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftsgd.cli.app import app
from ftsgd.cli.evaluate import eval_command
from ftsgd.data import scancache
from ftsgd.data.dataset import EpochSampler, batch_shard, plan_batches
from ftsgd.data.synthetic import make_image_folder
from ftsgd.errors import RecipeError
from ftsgd.recipe.load import load_recipe
from ftsgd.train.parallel import wrap_ddp
from ftsgd.train.trainer import Trainer
from ftsgd.utils.distributed import World

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32" or not dist.is_gloo_available(), reason="torchrun with Gloo"),
    pytest.mark.slow,
    pytest.mark.usefixtures("one_torch_thread"),
]

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "_fault_driver.py"
STEPS = 8  # 2 epochs of 27 images in global batches of 8: 8, 8, 8, 3
TIMING = ("images_per_s", "epoch_time_s", "peak_memory_bytes")
VIT = [
    'model.name="test_vit"',
    "model.kwargs={img_size=32}",
    "data.img_size=32",
    "data.num_workers=0",
    'data.augment="rrc_flip"',
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.epochs=2",
    "train.checkpoint_every=2",
    "optim.lr=0.05",
]
RESNET = [s.replace("test_vit", "test_resnet").replace("{img_size=32}", "{}") for s in VIT]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """27 training images (last global batch: 3, all on rank 1), val 21 and ood 3 (uneven shards)."""
    root = tmp_path_factory.mktemp("dist") / "data"
    return make_image_folder(root, classes=3, size=32, per_class={"train": 9, "val": 7, "ood": 1})


class Job:
    """A real ``torchrun`` job of the ftsgd CLI, its output in files."""

    def __init__(self, args: list[str], workdir: Path, tag: str, fault: str = "", nproc: int = 2) -> None:
        self.log = workdir / f"{tag}.steps"
        self.writes = workdir / f"{tag}.writes"
        self.out_path, self.err_path = workdir / f"{tag}.stdout", workdir / f"{tag}.stderr"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "FTSGD_FAULT": ",".join(filter(None, [f"log={self.log}", f"log_writes={self.writes}", fault])),
            "OMP_NUM_THREADS": "1",
        }
        env.pop("FTSGD_DEBUG", None)
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
        ]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = zygote.Popen(
                [*launcher, "--no-python", zygote.launcher(), str(DRIVER), *args],
                stdout=out,
                stderr=err,
                env={**env, "FTSGD_TEST_ZYGOTE": os.environ["FTSGD_TEST_ZYGOTE"]},
                start_new_session=True,
            )
        self.started = time.monotonic()

    def steps(self) -> list[tuple[int, int]]:
        """``(rank, pid)`` of every finished optimizer step so far."""
        if not self.log.exists():
            return []
        return [(int(r), int(p)) for _, r, p in (line.split() for line in self.log.read_text().splitlines())]

    def wait_for_steps(self, rank: int, n: int, timeout: float = 120) -> int:
        """Wait until ``rank`` finished ``n`` steps; returns its pid."""
        deadline = time.monotonic() + timeout
        while len(mine := [p for r, p in self.steps() if r == rank]) < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(
                    f"rank {rank} did not reach step {n} (rc {self.proc.returncode}): {self.stderr()}"
                )
            time.sleep(0.02)
        return mine[0]

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


def _train_args(data: Path, out: Path, sets: list[str], *extra: str) -> list[str]:
    args = ["train", "--data", str(data), "--out", str(out), *extra]
    for s in sets:
        args += ["--set", s]
    return args


def _resume_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--resume", "--quiet", *extra]


def _single(data: Path, out: Path, sets: list[str], resume: bool = False) -> None:
    """A one-process run in this process (the reference every job is compared with)."""
    recipe = (
        load_recipe(str(out / "recipe.toml"))
        if resume
        else load_recipe("sgd-freeze-embed", [*sets, f'data.root="{data}"'])
    )
    assert Trainer(recipe, out, resume=resume, quiet=True).fit() is not None


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _assert_weights_close(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Final weights (and BatchNorm statistics and counters) agree within ``atol``."""
    wa, wb = _checkpoint(a)["model"], _checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol, msg=key)


def _metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _assert_bitwise_identical(a: Path, b: Path) -> None:
    ca, cb = _checkpoint(a), _checkpoint(b)
    assert ca["state"]["global_step"] == cb["state"]["global_step"] == STEPS
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for i, state in ca["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, cb["optimizer"]["state"][i][key]), (i, key)
    ea, eb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert _metrics(a) == _metrics(b)


@pytest.fixture(scope="module")
def single_vit(data: Path) -> Path:
    out = data.parent / "single-vit"
    _single(data, out, VIT)
    return out


MLFLOW = importlib.util.find_spec("mlflow") is not None
"""The job logs to MLflow (a local file store) when it is installed: only rank 0 may."""


@pytest.fixture(scope="module")
def job_vit(data: Path) -> Job:
    """The ViT recipe as a 2-process job (DDP), with --json (and MLflow tracking, see :data:`MLFLOW`)."""
    tracking = ["train.tracking=mlflow"] if MLFLOW else []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", (data.parent / "mlruns").as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        args = _train_args(data, data.parent / "job-vit", [*VIT, *tracking], "--json")
        job = Job(args, data.parent, "job-vit")
    assert job.wait() == 0, job.stderr()
    return job


# ------------------------------------------------------------------------------------------ sharding


def test_every_image_of_a_global_batch_goes_to_exactly_one_process_in_micro_batches() -> None:
    for n in (1, 3, 8, 13, 16):
        for world in (1, 2, 3, 4):
            parts = [batch_shard(n, 4, r, world) for r in range(world)]
            assert parts[0].lo == 0 and parts[-1].hi == n
            assert all(a.hi == b.lo for a, b in itertools.pairwise(parts))
            assert all(p.lo % 4 == 0 for p in parts)  # micro-batches are the one-process ones
            assert sum(p.count for p in parts) == parts[0].total == -(-n // 4)


def test_sharded_batches_are_the_one_process_batches_in_pieces() -> None:
    order = EpochSampler(27, seed=3, epoch=1)
    whole = order.order()
    for world in (2, 3):
        per_rank = [plan_batches(whole, 8, start_batch=1, shard=(4, r, world)) for r in range(world)]
        assert all(len(p) == 3 for p in per_rank)  # every process runs every step
        for step in range(3):
            joined = [i for p in per_rank for i in p[step]]
            assert joined == whole[8 * (step + 1) : 8 * (step + 2)]


# ------------------------------------------------------------------------------------------ results


def test_two_processes_train_the_same_weights_as_one(data: Path, single_vit: Path, job_vit: Job) -> None:
    """DDP, augmentation and micro-batches on; a last batch without images for rank 0.

    In the default precision (``train.amp = "auto"``: fp32), which is what the 1e-5 of the docs is about;
    under bf16 autocast the two differ by ~1e-4 (docs/precision.md).
    """
    out = data.parent / "job-vit"
    _assert_weights_close(single_vit, out)
    summary = json.loads(job_vit.stdout())  # exactly one JSON object: rank 1 prints nothing
    assert summary["processes"] == 2 and summary["steps"] == STEPS
    assert summary["amp"] == json.loads((single_vit / "summary.json").read_text())["amp"] == "none"
    one, two = _metrics(single_vit), _metrics(out)
    for a, b in zip(one, two, strict=True):
        for split in ("val", "ood"):
            assert a["splits"][split]["n"] == b["splits"][split]["n"]
            assert a["splits"][split]["accuracy"] == b["splits"][split]["accuracy"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


def test_only_rank_0_writes_the_run_directory(
    data: Path, job_vit: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = data.parent / "job-vit"
    writes = [line.split() for line in job_vit.writes.read_text().splitlines()]
    assert writes and {rank for rank, _ in writes} == {"0"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            ".ftsgd.lock",
            "checkpoint.pt",
            "config.json",
            "dataset.json",
            "metrics.jsonl",
            "model.safetensors",
            "recipe.toml",
            "summary.json",
            *(["tracking.json"] if MLFLOW else []),
        ]
    )
    assert "[rank 1]" not in job_vit.stderr()
    if MLFLOW:  # one MLflow run, each epoch logged once
        from mlflow import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient((data.parent / "mlruns").as_uri())
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert run.info.run_name == "job-vit" and run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")]
        assert steps == [r["step"] for r in _metrics(out)]


def test_distributed_evaluation_counts_every_image_once(data: Path, job_vit: Job) -> None:
    """The best epoch's metrics, evaluated on 2 processes with uneven shards, are the one-process ones."""
    out = data.parent / "job-vit"
    best = json.loads((out / "summary.json").read_text())["best"]
    again = eval_command(out, data, splits=["val", "ood"], num_workers=0)
    assert best["val"]["n"] == 21 and best["ood"]["n"] == 3
    for split in ("val", "ood"):
        assert best[split]["n"] == again[split]["n"]
        assert best[split]["accuracy"] == again[split]["accuracy"]
        assert best[split]["loss"] == pytest.approx(again[split]["loss"], rel=1e-5)


@pytest.mark.parametrize("micro", [4, 0])
def test_batchnorm_cnn_matches_one_process(data: Path, micro: int) -> None:
    """test_resnet: micro-batches of 4 are normalised exactly as one process does (running statistics too).

    With ``micro_batch_size = 0`` each process normalises its own 4 images (SyncBatchNorm needs CUDA), which
    is a one-process run with ``micro_batch_size = 4``, as the warning says.
    """
    single = data.parent / "single-resnet"
    if not single.exists():
        _single(data, single, RESNET)
    out = data.parent / f"job-resnet-{micro}"
    args = _train_args(data, out, [*RESNET, f"train.micro_batch_size={micro}"], "--json")
    job = Job(args, data.parent, f"job-resnet-{micro}")
    assert job.wait() == 0, job.stderr()
    _assert_weights_close(single, out)
    warned = "BatchNorm statistics are computed over micro-batches of 4 images" in job.stderr()
    assert warned == (micro == 0)
    assert json.loads(job.stdout())["processes"] == 2


def test_bf16_weights_round_alike_on_every_process_and_train_as_one(data: Path) -> None:
    """train.weight_dtype = "bf16": each process draws the stochastic-rounding bits of a step from (seed,
    step, parameter), so both replicas apply the same rounded update to the same all-reduced gradient and
    the job ends with the one-process weights."""
    sets = [*VIT, 'train.weight_dtype="bf16"']
    single = data.parent / "single-bf16"
    _single(data, single, sets)
    job = Job(_train_args(data, data.parent / "job-bf16", sets, "--quiet"), data.parent, "job-bf16")
    assert job.wait() == 0, job.stderr()
    ca, cb = _checkpoint(single), _checkpoint(data.parent / "job-bf16")
    assert {v.dtype for v in cb["model"].values()} == {torch.bfloat16}
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key  # bit for bit
    momentum = [(s["momentum_buffer"], cb["optimizer"]["state"][i]["momentum_buffer"]) for i, s in
                ca["optimizer"]["state"].items()]  # fmt: skip
    assert momentum and all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in momentum)
    for a, b in zip(_metrics(single), _metrics(data.parent / "job-bf16"), strict=True):
        for split in ("val", "ood"):
            assert a["splits"][split]["accuracy"] == b["splits"][split]["accuracy"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------ faults


@pytest.fixture(scope="module")
def killed(data: Path) -> Path:
    """The ViT job with its rank 1 killed by SIGKILL after 5 steps: its run directory, to copy from."""
    out = data.parent / "killed"
    job = Job(_train_args(data, out, VIT, "--quiet"), data.parent, "killed", fault="delay=0.3")
    pid = job.wait_for_steps(rank=1, n=5)
    os.kill(pid, signal.SIGKILL)
    assert job.wait() != 0
    assert "rank      : 1" in job.stderr()  # torchrun names the rank that died
    assert 4 <= _checkpoint(out)["state"]["global_step"] < STEPS
    return out


def test_killed_job_resumes_bitwise_on_two_processes_and_closely_on_one(
    data: Path, single_vit: Path, job_vit: Job, killed: Path
) -> None:
    two, one = data.parent / "killed-two", data.parent / "killed-one"
    shutil.copytree(killed, two)
    shutil.copytree(killed, one)
    resumed = Job(_resume_args(data, two), data.parent, "resumed")
    assert resumed.wait() == 0, resumed.stderr()
    _assert_bitwise_identical(data.parent / "job-vit", two)

    _single(data, one, VIT, resume=True)  # the 2-process checkpoint on 1 process
    _assert_weights_close(single_vit, one)
    assert json.loads((one / "summary.json").read_text())["processes"] == 1


def test_a_rank_that_fails_ends_the_job_naming_it(data: Path) -> None:
    job = Job(
        _train_args(data, data.parent / "fails", VIT, "--quiet"), data.parent, "fails", "fail_on_rank=1:3"
    )
    assert job.wait(timeout=60) != 0
    assert time.monotonic() - job.started < 60
    err = job.stderr()
    assert "[rank 1] error: injected failure in step 3" in err
    assert "[rank 0] error: lost contact with the other processes of the job" in err
    assert "rank      : 1" in err


def test_sigterm_stops_every_rank_at_the_same_step_and_saves_once(data: Path) -> None:
    """Also: the pre-flight scan is shared (each process decodes half the files) and still finds every bad one."""
    bad_data = data.parent / "term-data"
    shutil.copytree(data, bad_data)
    for split in ("train", "val"):
        (bad_data / split / "circle" / "zz-broken.png").write_bytes(b"not an image")
    past = time.time() - 60  # files written in the last 2 s are never cached ("racily clean"): age them
    for image in bad_data.rglob("*.png"):
        os.utime(image, (past, past))
    out = data.parent / "term"
    sets = [*VIT, "train.checkpoint_every=0", "train.epochs=3", 'data.on_bad_image="skip"']
    job = Job(_train_args(bad_data, out, sets), data.parent, "term", fault="delay=0.4")
    pid = job.wait_for_steps(rank=1, n=2)
    os.kill(pid, signal.SIGTERM)  # one process first, as a scheduler's signal may land
    assert job.wait() != 0
    per_rank = [sum(1 for r, _ in job.steps() if r == rank) for rank in (0, 1)]
    assert per_rank[0] == per_rank[1] == _checkpoint(out)["state"]["global_step"]
    # the processes exit 128 + SIGTERM; when one has exited, torchrun stops the others itself (-15), which
    # may land while they wind down after saving: torchrun's timing, not ours (the checkpoint is checked below)
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", job.stderr())
    assert "143" in codes and set(codes) <= {"143", "-15"}, job.stderr()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "  # plain progress lines start with the time
    lines = [re.sub(stamp, "", line) for line in job.stdout().splitlines()]
    stopped = [line for line in lines if line.startswith("SIGTERM: checkpoint saved")]
    assert len(stopped) == 1
    writes = [line.split() for line in job.writes.read_text().splitlines()]
    assert [name for rank, name in writes if name == "checkpoint.pt"] == ["checkpoint.pt"] * (
        1 + (per_rank[0] > 4)  # an epoch end on the way writes its own
    )
    assert "interrupted by SIGTERM; checkpoint saved" in job.stderr()
    assert "[rank 1] error" not in job.stderr()
    assert {rank for rank, _ in writes} == {"0"}
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in skipped) == ["train", "val"]
    # the scan cache, written by rank 0 alone, holds every good file, whichever process decoded it
    train = bad_data / "train"
    good = {p.relative_to(train).as_posix() for p in train.rglob("*.*") if p.name != "zz-broken.png"}
    entries = scancache.load_entries(Path(os.environ["FTSGD_CACHE_DIR"]) / "scan", train)
    assert entries is not None and set(entries) == good and len(good) > 2


# ------------------------------------------------------------------------------------------ FSDP


def test_sharded_fsdp_job_resumes_a_ddp_checkpoint_trains_and_checkpoints(
    data: Path, single_vit: Path, killed: Path
) -> None:
    """The killed DDP job finished with train.shard = true: FSDP2 loads the one-process-format checkpoint,
    trains (reduce-scatter, sharded SGD momentum), writes checkpoints and the export gathered on rank 0."""
    out = data.parent / "fsdp"
    shutil.copytree(killed, out)
    recipe = (out / "recipe.toml").read_text()
    assert recipe.count("\nshard = false\n") == 1
    (out / "recipe.toml").write_text(recipe.replace("\nshard = false\n", "\nshard = true\n"))
    job = Job(_resume_args(data, out), data.parent, "fsdp")
    assert job.wait() == 0, job.stderr()
    assert json.loads((out / "summary.json").read_text())["sharded"] is True
    _assert_weights_close(single_vit, out)
    sharded, plain = _checkpoint(out)["optimizer"], _checkpoint(single_vit)["optimizer"]
    assert sorted(sharded["state"]) == sorted(plain["state"])  # one-process format: parameter indices
    for i, state in plain["state"].items():  # momentum buffers gathered onto the right parameters
        torch.testing.assert_close(
            sharded["state"][i]["momentum_buffer"], state["momentum_buffer"], rtol=0, atol=1e-5
        )
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == load_file(single_vit / "model.safetensors").keys()


# ------------------------------------------------------------------------------------------ in-process


def test_step_in_backward_is_refused_under_torchrun(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    recipe = load_recipe(
        "sgd-freeze-embed",
        [*VIT, "train.micro_batch_size=0", "optim.step_in_backward=true", f'data.root="{data}"'],
    )
    with pytest.raises(RecipeError, match=r"optim\.step_in_backward: not under torchrun"):
        Trainer(recipe, data.parent / "sib")
    assert not dist.is_initialized()
    result = CliRunner().invoke(
        app,
        _train_args(
            data, data.parent / "sib-cli", [*VIT, "train.micro_batch_size=0", "optim.step_in_backward=true"]
        ),
    )
    assert result.exit_code == 2 and "[rank 0] error:" in result.output


def _record_bucket(seen, bucket):  # type: ignore[no-untyped-def]
    """A DDP communication hook that records each bucket's parameters (one process: nothing to reduce).

    Not annotated: DDP checks the annotations' objects (``dist.GradBucket``, ``Future[Tensor]``), and this
    file's ``from __future__ import annotations`` would turn them into strings.
    """
    seen.extend(bucket.parameters())
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def test_frozen_parameters_are_in_no_ddp_bucket(data: Path, tmp_path: Path) -> None:
    """A frozen embedding is never communicated: DDP's buckets hold exactly the trainable parameters."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer = Trainer(
            load_recipe("sgd-freeze-embed", [*VIT, f'data.root="{data}"']), tmp_path / "run", quiet=True
        )
        trainer.setup()
        ddp = wrap_ddp(trainer.model, World(device=torch.device("cpu")))
        seen: list[torch.Tensor] = []
        ddp.register_comm_hook(seen, _record_bucket)
        ddp(torch.randn(2, 3, 32, 32)).sum().backward()
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        communicated = {names[id(p)] for p in seen}
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert communicated == trainable
        assert not communicated & set(trainer.prepared.frozen) and trainer.prepared.frozen
        size = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
        assert ddp._get_ddp_logging_data()["total_parameter_size_bytes"] == size
    finally:
        dist.destroy_process_group()


def test_inspect_estimates_memory_per_gpu_with_ddp_and_fsdp() -> None:
    args = ["inspect", "test_vit", "--set", "model.kwargs={img_size=32}", "--set", "train.batch_size=32"]
    result = CliRunner().invoke(app, [*args, "--nproc", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    one, job = report["memory"], report["memory_per_process"]
    assert job["nproc"] == 4 and job["micro_batch"] == 8  # the global batch of 32 shared by 4 GPUs
    ddp, fsdp = job["ddp"], job["fsdp"]
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer_state"]) == (
        one["weights"],
        one["gradients"],
        one["optimizer_state"],
    )
    assert fsdp["gradients"] == -(-one["gradients"] // 4)
    assert fsdp["optimizer_state"] == -(-one["optimizer_state"] // 4)
    assert 0 < fsdp["gathered"] < one["weights"]
    assert fsdp["total"] < ddp["total"] == sum(v for k, v in ddp.items() if k != "total")
    text = CliRunner().invoke(app, [*args, "--nproc", "4"]).output
    assert "Memory per GPU with 4 processes" in text and "FSDP (train.shard)" in text
