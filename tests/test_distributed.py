"""Process preparation, launch command lines and DeepSpeed configs, without starting a process group.

The real DeepSpeed runs (2 processes over gloo) are in test_distributed_deepspeed.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cogagent_nb.train import distributed as dist
from cogagent_nb.train import zero_memory as zm

pytestmark = pytest.mark.usefixtures("restore_environ")  # tests/conftest.py


def test_launch_info_reads_the_launcher_variables():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    info = dist.launch_info(env)
    assert (info.rank, info.local_rank, info.world_size, info.master_port) == (3, 1, 4, 29500)
    assert info.launched and info.distributed and not info.is_main
    alone = dist.launch_info({})
    assert (alone.rank, alone.world_size, alone.launched, alone.distributed) == (0, 1, False, False)
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        dist.launch_info({"WORLD_SIZE": "two"})


def test_single_process_env_fills_only_what_is_missing():
    env = {"MASTER_PORT": "12345"}
    added = dist.single_process_env(env)
    assert added == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert env["MASTER_PORT"] == "12345"
    fresh: dict[str, str] = {}
    dist.single_process_env(fresh)
    with socket.socket() as sock:  # the chosen port is really free
        sock.bind(("127.0.0.1", int(fresh["MASTER_PORT"])))


def test_local_rank_argument_of_the_deepspeed_launcher_is_consumed():
    env: dict[str, str] = {}
    argv = ["--local_rank=1", "data", "model", "configs/sft.yaml", "yes"]
    assert dist.consume_local_rank_argument(argv, env) == ["data", "model", "configs/sft.yaml", "yes"]
    assert env["LOCAL_RANK"] == "1"
    env = {"LOCAL_RANK": "0"}  # the launcher's variable wins
    assert dist.consume_local_rank_argument(["d", "--local_rank", "5", "m"], env) == ["d", "m"]
    assert env["LOCAL_RANK"] == "0"


def test_jit_cache_default_and_user_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    env: dict[str, str] = {}
    assert dist.use_jit_cache(env) == tmp_path / "cogagent_nb" / "torch_extensions"
    env = {"TORCH_EXTENSIONS_DIR": "/elsewhere"}
    assert dist.use_jit_cache(env) == Path("/elsewhere")


@pytest.mark.parametrize("stage", [2, 3])
def test_config_files_are_the_official_values_and_every_field_is_explained(stage, repo_root):
    on_disk = json.loads((repo_root / "configs" / f"ds_zero_{stage}.json").read_text())
    assert on_disk == dist.deepspeed_config(stage)
    assert dist.zero_stage(on_disk) == stage
    docs = (repo_root / "docs" / "DISTRIBUTED.md").read_text()
    for key, _, meaning in dist.explain_deepspeed_config(on_disk):
        assert meaning != "(not one of the official fields)", key
        assert f"`{key}`" in docs, f"docs/DISTRIBUTED.md does not explain {key}"


def test_unknown_fields_are_flagged_and_bad_json_names_file_and_line(tmp_path):
    rows = dict((k, m) for k, _, m in dist.explain_deepspeed_config({"zero_optimization": {"stagee": 2}}))
    assert rows == {"zero_optimization.stagee": "(not one of the official fields)"}
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "bf16": {"enabled": auto}\n}\n')
    with pytest.raises(dist.DeepSpeedConfigError, match=r"ds.json:2: not valid JSON"):
        dist.read_deepspeed_config(bad)
    with pytest.raises(dist.DeepSpeedConfigError, match="not found"):
        dist.read_deepspeed_config(tmp_path / "missing.json")
    written = dist.write_deepspeed_config(tmp_path / "z3.json", 3)
    assert dist.read_deepspeed_config(written) == dist.deepspeed_config(3)


def test_prepare_distributed_on_cpu_with_deepspeed(monkeypatch, tmp_path):
    for name in dist.LAUNCH_VARIABLES + ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(dist, "accelerator_available", lambda: False)
    calls: list[str] = []
    monkeypatch.setattr(dist, "init_cpu_deepspeed_state", lambda: calls.append("state"))
    given = {"output_dir": "out", "deepspeed": "configs/ds_zero_2.json", "accelerator_config": {"split_batches": False}}
    args = dist.prepare_distributed(given)
    assert args["accelerator_config"] == {"split_batches": False, "use_configured_state": True}
    assert "use_configured_state" not in given["accelerator_config"], "the input must not be modified"
    assert calls == ["state"]
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"]
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "cogagent_nb" / "torch_extensions")
    assert os.environ["DS_ACCELERATOR"] == "cpu", "DeepSpeed is told the CPU is meant, so it does not warn"


def test_cpu_accelerator_is_set_unless_the_user_chose_one():
    env: dict[str, str] = {}
    assert dist.use_cpu_accelerator(env) == "cpu" and env == {"DS_ACCELERATOR": "cpu"}
    env = {"DS_ACCELERATOR": "npu"}
    assert dist.use_cpu_accelerator(env) == "npu" and env == {"DS_ACCELERATOR": "npu"}


def test_prepare_distributed_on_gpu_changes_nothing_but_the_env(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "accelerator_available", lambda: True)
    monkeypatch.setattr(dist, "init_cpu_deepspeed_state", lambda: pytest.fail("no CPU state on a GPU"))
    given = {"output_dir": "out", "deepspeed": "configs/ds_zero_3.json"}
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert dist.prepare_distributed(given) == given
    assert "DS_ACCELERATOR" not in os.environ, "DeepSpeed finds the GPU itself"


def test_deepspeed_with_use_cpu_on_a_gpu_machine_is_an_error_that_says_what_to_set(monkeypatch):
    monkeypatch.setattr(dist, "accelerator_available", lambda: True)
    with pytest.raises(dist.DeepSpeedConfigError, match="--set training_args.use_cpu=false"):
        dist.prepare_distributed({"output_dir": "out", "deepspeed": "ds.json", "use_cpu": True})


def test_prepare_distributed_plain_ddp_on_cpu_uses_gloo(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "accelerator_available", lambda: False)
    args = dist.prepare_distributed({"output_dir": "out"})
    assert args["use_cpu"] is True and args["ddp_backend"] == "gloo"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.prepare_distributed({"output_dir": "out"}) == {"output_dir": "out"}
    assert os.environ["DS_ACCELERATOR"] == "cpu", "transformers imports DeepSpeed even without a config: no warning"


def test_command_lines():
    standalone = dist.torchrun_command(["d", "m", "c.yaml"], nproc_per_node=2)
    assert standalone[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert standalone[3:] == ["--standalone", "--nnodes=1", "--nproc_per_node=2", "finetune.py", "d", "m", "c.yaml"]
    node = dist.torchrun_command(["d"], nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400")
    assert node[3:] == [
        "--nnodes=2",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.1:29400",
        "--node_rank=1",
        "--nproc_per_node=8",
        "finetune.py",
        "d",
    ]
    ds = dist.deepspeed_command(["d", "m", "c.yaml"], num_gpus=8, master_port=29501)
    assert ds[0].endswith("deepspeed") and ds[1:] == [
        "--num_gpus=8",
        "--master_port=29501",
        "finetune.py",
        "d",
        "m",
        "c.yaml",
    ]


def test_launch_streams_lines_and_reports_failure(capsys):
    code = "import os; print('one'); print(os.environ['OMP_NUM_THREADS']); raise SystemExit(3)"
    result = dist.launch([sys.executable, "-c", code])
    assert result.lines == ["one", "1"] and result.returncode == 3
    assert "one\n1\n" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="exited with 3; last lines:\none\n1"):
        result.check()


def test_launch_keeps_a_progress_bars_last_state_not_every_redraw(capsys):
    # tqdm redraws with "\r" and ends with "\n": two redraws per step used to become two lines per step
    code = "import sys; w = sys.stdout.write\n"
    code += "w('start\\n'); [w(f'\\rtraining {i}/3') for i in range(4)]; w('\\n')\n"
    code += "w('\\rloading 1/2\\rloading 2/2'); w('\\r\\n'); w('done\\n')"
    result = dist.launch([sys.executable, "-c", code])
    assert result.lines == ["start", "training 3/3", "loading 2/2", "done"]
    # echoed as a terminal would draw it: each redraw returns to the start of its line
    assert "start\ntraining 0/3\rtraining 1/3\r" in capsys.readouterr().out


def test_a_failed_launch_shows_the_workers_error_above_the_launchers_summary():
    # a worker's traceback, then 50 lines of launcher summary and the launcher's own traceback (as torchrun)
    code = "import sys; print('[rank1]: Traceback (most recent call last):'); print('[rank1]: ValueError: bad row')\n"
    code += "for i in range(50): print(f'summary {i}')\n"
    code += "print('Traceback (most recent call last):'); print('  File \"/v/torch/distributed/run.py\", line 9')\n"
    code += "sys.exit(1)"
    result = dist.launch([sys.executable, "-c", code], echo=False)
    assert result.first_error().splitlines()[:2] == [
        "[rank1]: Traceback (most recent call last):",
        "[rank1]: ValueError: bad row",
    ]
    with pytest.raises(RuntimeError, match=r"first error:\n\[rank1\]: Traceback.*\n.*ValueError: bad row") as raised:
        result.check()
    assert "last lines:" in str(raised.value) and "summary 49" in str(raised.value)
    # this package's one-line refusal, printed by each worker before it exits with 2
    refusal = [
        "error: configs/lora.yaml: training_args.lr_scheduler_type: 'x' is str, expected one of ...",
        "E1202 08:06:56 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2)",
    ]
    assert dist.LaunchResult(["x"], 1, 0.1, refusal).first_error().startswith("error: configs/lora.yaml")
    # only the launcher's traceback: nothing to single out
    assert dist.LaunchResult(["x"], 1, 0.1, result.lines[52:]).first_error() == ""


def test_stale_shm_buffers_are_removed_but_not_one_a_live_process_maps(tmp_path):
    uid = os.getuid()
    live, stale, other = (
        tmp_path / f"deepspeed_allreduce_buffer_{u}_127.0.0.1_29500_{r}" for u, r in ((uid, 0), (uid, 1), (uid + 1, 0))
    )
    for buffer in (live, stale, other):
        buffer.write_bytes(b"\0" * 4096)
    # a rank of another run that still has its buffer mapped
    code = (
        f"import mmap, sys; f = open({str(live)!r}, 'r+b'); m = mmap.mmap(f.fileno(), 0); f.close(); "
        "print('mapped', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert dist.remove_stale_shm_buffers(shm_dir=tmp_path) == [stale]
    finally:
        holder.communicate("")
    assert live.exists() and not stale.exists() and other.exists(), "another user's buffer is not ours to remove"
    assert dist.remove_stale_shm_buffers(shm_dir=tmp_path) == [live], "once unmapped, it is stale too"


def test_a_failed_launch_frees_the_shm_buffers_its_crashed_ranks_left(capsys):
    # a crashed rank runs no exit handler; launch() then removes buffers that no process uses any more
    buffer = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{os.getpid()}_0"
    code = f"import os; open({str(buffer)!r}, 'wb').write(bytes(4096)); os.abort()"
    try:
        result = dist.launch([sys.executable, "-c", code])
        assert result.returncode < 0 and not buffer.exists()
        assert "shared-memory buffer(s) that the failed run's DeepSpeed left" in capsys.readouterr().out
    finally:
        buffer.unlink(missing_ok=True)


def test_deepspeed_shm_buffer_is_named_as_deepspeed_names_it_and_only_when_it_makes_one(tmp_path):
    env = {"LOCAL_SIZE": "2", "WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}
    buffer = dist.deepspeed_shm_buffer(env, shm_dir=tmp_path)
    assert buffer == tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29512_1"
    # torchrun sets no LOCAL_SIZE, and ranks on several machines use no shared memory: no buffer
    assert dist.deepspeed_shm_buffer({**env, "LOCAL_SIZE": ""}) is None
    assert dist.deepspeed_shm_buffer({**env, "WORLD_SIZE": "4"}) is None


def test_finish_distributed_closes_the_process_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as torch_dist

    assert not torch_dist.is_initialized() and dist.finish_distributed() is False
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.finish_distributed() is True
    assert not torch_dist.is_initialized()


def test_a_worker_killed_by_a_signal_is_named_not_the_siblings_the_launcher_ended():
    # torchrun's summary: the sibling it ended under "Failures", the worker that failed first under "Root Cause"
    sibling, root = ["Failures:", "  traceback : Signal 15 (SIGTERM) received by PID 7"], ["Root Cause (first ...):"]
    torchrun = [*sibling, *root, "  traceback : Signal 6 (SIGABRT) received by PID 8"]
    assert dist.LaunchResult(["torchrun"], 1, 1.0, torchrun).worker_signal() == "SIGABRT"
    # a worker that exited with 2 (a config error) first: the sibling's SIGTERM is not the cause
    assert (
        dist.LaunchResult(["torchrun"], 1, 1.0, [*sibling, *root, "  exitcode  : 2 (pid: 8)"]).worker_signal() is None
    )
    deepspeed = ["[ERROR] [launch.py:259:sigkill_handler] ['python', 'finetune.py'] exits with return code = -11"]
    assert dist.LaunchResult(["deepspeed"], 1, 1.0, deepspeed).worker_signal() == "SIGSEGV"
    assert dist.LaunchResult(["x"], 1, 1.0, ["Traceback (most recent call last):"]).worker_signal() is None
    with pytest.raises(RuntimeError, match=r"exited with 1 \(a worker was killed by SIGABRT\); last lines"):
        dist.LaunchResult(["torchrun"], 1, 1.0, torchrun).check()


def test_launch_stops_a_silent_process_at_the_timeout():
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    code += "time.sleep(60)"  # a launcher with a worker, both silent
    with pytest.raises(TimeoutError, match="ran longer than 1.5 s"):
        dist.launch([sys.executable, "-c", code], echo=False, timeout=1.5)


def test_zero_memory_arithmetic_of_the_paper():
    # ZeRO paper, figure 1: 7.5 B parameters, 64 GPUs, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB per GPU
    psi, n = 7.5e9, 64
    totals = [zm.zero_memory(int(psi), int(psi), stage=s, world_size=n).total / 1e9 for s in (0, 1, 2, 3)]
    assert [round(t, 1) for t in totals] == [120.0, 31.4, 16.6, 1.9]
    lora = zm.zero_memory(1000, 10, stage=2, world_size=2)
    assert (lora.weights, lora.gradients, lora.optimizer) == (2000, 10, 60)
    with pytest.raises(ValueError, match="stage must be"):
        zm.zero_memory(10, 10, stage=4, world_size=1)


def test_parameter_counts_of_the_9b_preset():
    total, trainable = zm.parameter_counts()
    assert total == trainable and 13.5e9 < total < 14.5e9  # GLM-4 9.4 B + EVA2-CLIP-E 4.5 B
    total_lora, lora = zm.parameter_counts(lora_rank=8)
    # 40 decoder query_key_value 4096 -> 4608 (32 query heads + 2 x 2 KV heads of 128) and 63 vision ones
    # 1792 -> 3 x 1792, each r x (in + out)
    assert lora == 40 * 8 * (4096 + 4608) + 63 * 8 * (1792 + 3 * 1792)
    assert total_lora == total + lora


def test_cuda_arch_list_is_the_plain_capability_unless_the_user_set_one():
    """DeepSpeed 0.19 cannot parse torch 2.11's "9.0a"; the package hands it "9.0" (seen on an H200)."""
    env: dict[str, str] = {}
    assert dist.set_cuda_arch_list(env, capabilities=[(9, 0), (9, 0), (8, 0)]) == "8.0;9.0"
    assert env == {"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    mine = {"TORCH_CUDA_ARCH_LIST": "9.0a"}
    assert dist.set_cuda_arch_list(mine, capabilities=[(9, 0)]) == "9.0a"  # the user's choice stands
