"""ServerArgs: flags generated from the dataclass, derived defaults, validation."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from runtime.server_args import (
    ServerArgs,
    make_parser,
    parse_server_args_or_exit,
    prepare_server_args,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Pin the device so tests do not depend on the machine (and skip torch import).
BASE = ["--model-path", "/models/tiny", "--device", "cpu"]


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_field_has_help_and_a_flag() -> None:
    parser = make_parser()
    option_strings = {s for a in parser._actions for s in a.option_strings}
    missing_help = [f.name for f in fields(ServerArgs) if not f.metadata.get("help")]
    missing_flag = [f.name for f in fields(ServerArgs) if _flag(f.name) not in option_strings]
    assert missing_help == []
    assert missing_flag == []
    # Help renders (a stray % in help text would break argparse here).
    assert "--mem-fraction-static" in parser.format_help()


def test_required_fields_present() -> None:
    names = {f.name for f in fields(ServerArgs)}
    for expected in (
        "model_path", "tokenizer_path", "dtype", "device", "context_length", "page_size",
        "max_total_tokens", "mem_fraction_static", "max_running_requests",
        "max_prefill_tokens", "chunked_prefill_size", "schedule_policy",
        "disable_radix_cache", "disable_overlap", "disable_cuda_graph",
        "cuda_graph_max_bs", "attention_backend", "tp_size", "nnodes", "node_rank",
        "dist_init_addr", "host", "port", "api_key", "served_model_name", "random_seed",
        "log_level", "trust_remote_code", "stream_interval", "skip_tokenizer_init",
    ):
        assert expected in names


def test_defaults() -> None:
    args = prepare_server_args(BASE)
    assert args.model_path == "/models/tiny"
    assert args.dtype == "auto"
    assert args.page_size == 1
    assert args.context_length is None
    assert args.max_total_tokens is None
    assert args.mem_fraction_static == 0.88
    assert args.max_running_requests == 256
    assert args.max_prefill_tokens == 16384
    assert args.chunked_prefill_size == 8192
    assert args.chunked_prefill_enabled
    assert args.schedule_policy == "lpm"
    assert args.cuda_graph_max_bs == 64
    assert (args.tp_size, args.nnodes, args.node_rank) == (1, 1, 0)
    assert args.dist_init_addr is None
    assert (args.host, args.port) == ("127.0.0.1", 30000)
    assert args.api_key is None
    assert args.random_seed == 0
    assert args.log_level == "info"
    assert args.stream_interval == 1
    for name in ("disable_radix_cache", "disable_overlap", "disable_cuda_graph",
                 "trust_remote_code", "skip_tokenizer_init"):
        assert getattr(args, name) is False
    # CLI and direct construction agree.
    assert args == ServerArgs(model_path="/models/tiny", device="cpu")


def test_model_path_is_required() -> None:
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args([])
    assert exc.value.code == 2


def test_values_round_trip() -> None:
    argv = BASE + [
        "--tokenizer-path", "/tok", "--dtype", "bfloat16", "--context-length", "512",
        "--page-size", "16", "--max-total-tokens", "4096", "--mem-fraction-static", "0.5",
        "--max-running-requests", "8", "--max-prefill-tokens", "1024",
        "--chunked-prefill-size", "256", "--schedule-policy", "dfs-weight",
        "--cuda-graph-max-bs", "16", "--attention-backend", "triton", "--tp-size", "2",
        "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "10.0.0.1:5000",
        "--host", "0.0.0.0", "--port", "8080", "--api-key", "sk", "--served-model-name",
        "tiny", "--random-seed", "7", "--log-level", "debug", "--stream-interval", "4",
    ]
    args = prepare_server_args(argv)
    assert args.tokenizer_path == "/tok"
    assert args.dtype == "bfloat16"
    assert args.context_length == 512
    assert args.page_size == 16
    assert args.max_total_tokens == 4096
    assert args.mem_fraction_static == 0.5
    assert args.max_running_requests == 8
    assert args.max_prefill_tokens == 1024
    assert args.chunked_prefill_size == 256
    assert args.schedule_policy == "dfs-weight"
    assert args.cuda_graph_max_bs == 16
    assert args.attention_backend == "triton"
    assert (args.tp_size, args.nnodes, args.node_rank) == (2, 2, 1)
    assert args.dist_init_addr == "10.0.0.1:5000"
    assert (args.host, args.port, args.api_key) == ("0.0.0.0", 8080, "sk")
    assert args.served_model_name == "tiny"
    assert (args.random_seed, args.log_level, args.stream_interval) == (7, "debug", 4)


def test_bool_flags() -> None:
    names = ["disable_radix_cache", "disable_overlap", "disable_cuda_graph",
             "trust_remote_code", "skip_tokenizer_init"]
    args = prepare_server_args(BASE + [_flag(n) for n in names])
    for name in names:
        assert getattr(args, name) is True
    # store_true flags take no value.
    with pytest.raises(SystemExit):
        make_parser().parse_args(BASE + ["--disable-overlap", "yes"])


def test_derived_defaults() -> None:
    args = prepare_server_args(BASE)
    assert args.tokenizer_path == "/models/tiny"
    assert args.served_model_name == "/models/tiny"
    assert args.device == "cpu"
    assert args.attention_backend == "cpu"  # the native kernels, or torch_native inside it


def test_cpu_attention_backend_needs_a_cpu() -> None:
    with pytest.raises(ValueError, match="--attention-backend cpu requires --device cpu"):
        ServerArgs(model_path="/m", device="cuda", attention_backend="cpu")


def test_device_detected_when_unset() -> None:
    args = ServerArgs(model_path="/m")
    assert args.device in ("cpu", "cuda")
    if args.device == "cpu":
        assert args.attention_backend == "cpu"
    else:
        assert args.attention_backend in ("flashinfer", "triton")


def test_triton_allowed_on_cpu() -> None:
    # Triton kernels run on cpu under TRITON_INTERPRET=1.
    assert prepare_server_args(BASE + ["--attention-backend", "triton"]).device == "cpu"


def test_attention_backend_choices_are_the_registry() -> None:
    from layers.attention.registry import ATTENTION_BACKENDS, backends_for_device
    from runtime.device_defaults import default_attention_backend

    (field,) = [f for f in fields(ServerArgs) if f.name == "attention_backend"]
    assert field.metadata["choices"] == tuple(ATTENTION_BACKENDS)
    (action,) = [a for a in make_parser()._actions if a.dest == "attention_backend"]
    assert action.metavar == "{" + ",".join(ATTENTION_BACKENDS) + "}"
    # The defaults are registry names the device accepts.
    for device, dtype in (("cpu", "auto"), ("cuda", "bfloat16"), ("cuda", "float32")):
        assert default_attention_backend(device, dtype) in backends_for_device(device)


def test_unknown_attention_backend_fails_clearly() -> None:
    from layers.attention.registry import create_attention_backend

    with pytest.raises(ValueError, match=r"--attention-backend must be one of cpu, torch_native, triton, "
                                         r"flashinfer; got 'flashattn'"):
        ServerArgs(model_path="/m", device="cpu", attention_backend="flashattn")
    # Configs built without ServerArgs (benchmarks, tests) get the same list.
    with pytest.raises(ValueError, match=r"unknown attention backend 'flashattn'; available: cpu, "
                                         r"torch_native, triton, flashinfer"):
        create_attention_backend("flashattn", "cpu", None, flashinfer_workspace_mb=256)


def test_cpu_backends_never_import_gpu_kernels() -> None:
    # The registry names every backend without importing any; building a CPU
    # one must not pull in triton or flashinfer.
    proc = _run_python(
        "import sys, torch\n"
        "from layers.attention.registry import create_attention_backend\n"
        "for name in ('torch_native', 'cpu'):\n"
        "    create_attention_backend(name, torch.device('cpu'), torch.float32, flashinfer_workspace_mb=256)\n"
        "assert 'triton' not in sys.modules and 'flashinfer' not in sys.modules, sorted(sys.modules)\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_chunked_prefill_disable_values() -> None:
    for value in ("-1", "0"):
        args = prepare_server_args(BASE + ["--page-size", "16", "--chunked-prefill-size", value])
        assert not args.chunked_prefill_enabled


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--page-size", "0"], "--page-size must be >= 1, got 0"),
        (["--schedule-policy", "xyz"],
         "--schedule-policy must be one of fcfs, lpm, dfs-weight; got 'xyz'"),
        (["--dtype", "int8"], "--dtype must be one of"),
        (["--log-level", "loud"], "--log-level must be one of"),
        (["--attention-backend", "magic"], "--attention-backend must be one of"),
        (["--tp-size", "0"], "--tp-size must be >= 1"),
        (["--max-running-requests", "0"], "--max-running-requests must be >= 1"),
        (["--mem-fraction-static", "0"], "--mem-fraction-static must be in (0, 1]"),
        (["--mem-fraction-static", "1.5"], "--mem-fraction-static must be in (0, 1]"),
        (["--port", "0"], "--port must be in 1..65535"),
        (["--port", "70000"], "--port must be in 1..65535"),
        (["--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"],
         "--node-rank must be < --nnodes"),
        (["--nnodes", "2"], "--nnodes > 1 needs --dist-init-addr"),
        (["--attention-backend", "flashinfer"],
         "--attention-backend flashinfer requires --device cuda"),
        (["--page-size", "16", "--chunked-prefill-size", "100"],
         "--chunked-prefill-size must be a multiple of --page-size"),
        (["--chunked-prefill-size", "-5"], "--chunked-prefill-size must be > 0"),
        (["--context-length", "0"], "--context-length must be >= 1"),
        (["--page-size", "16", "--max-total-tokens", "8"], "--max-total-tokens must be >="),
    ],
)
def test_validation_errors_name_the_flag(extra: list[str], expected: str) -> None:
    with pytest.raises(ValueError) as exc:
        prepare_server_args(BASE + extra)
    assert expected in str(exc.value)


def test_device_choice_validated() -> None:
    with pytest.raises(ValueError, match="--device must be one of cpu, cuda"):
        ServerArgs(model_path="/m", device="tpu")


def test_from_cli_args_uses_namespace() -> None:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(BASE + ["--port", "1234"])
    assert ServerArgs.from_cli_args(ns).port == 1234


def test_parse_or_exit_returns_args_when_valid() -> None:
    assert parse_server_args_or_exit(BASE).model_path == "/models/tiny"


def test_parse_or_exit_exits_2_with_message() -> None:
    proc = _run_python(
        "from runtime.server_args import parse_server_args_or_exit\n"
        "parse_server_args_or_exit(['--model-path', 'm', '--device', 'cpu', "
        "'--page-size', '0'])\n"
    )
    assert proc.returncode == 2, proc.stderr
    assert "--page-size must be >= 1, got 0" in proc.stderr
    assert "usage:" in proc.stderr


def test_import_does_not_pull_in_torch() -> None:
    proc = _run_python(
        "import runtime.server_args, sys\n"
        "assert 'torch' not in sys.modules\n"
        "assert 'model_executor' not in sys.modules\n"
        "runtime.server_args.prepare_server_args(['--model-path', 'm', '--device', 'cpu'])\n"
        "assert 'torch' not in sys.modules\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_model_runner_config_mapping() -> None:
    from model_executor.model_config import ModelRunnerConfig

    args = prepare_server_args(BASE + [
        "--dtype", "float32", "--context-length", "256", "--page-size", "4",
        "--max-total-tokens", "1024", "--mem-fraction-static", "0.6",
        "--max-running-requests", "12", "--attention-backend", "triton",
        "--disable-cuda-graph", "--tp-size", "2", "--random-seed", "3",
        "--chunked-prefill-size", "64",
    ])
    cfg = args.model_runner_config(tp_rank=1)
    assert cfg == ModelRunnerConfig(
        model_path="/models/tiny", dtype="float32", device="cpu", context_length=256,
        page_size=4, max_total_tokens=1024, mem_fraction_static=0.6,
        max_running_requests=12, attention_backend="triton", disable_cuda_graph=True,
        tp_size=2, tp_rank=1, random_seed=3,
    )
    assert args.model_runner_config().tp_rank == 0
    with pytest.raises(ValueError, match="tp_rank"):
        args.model_runner_config(tp_rank=2)


def test_scheduler_config_mapping():
    args = prepare_server_args([
        "--model-path", "m", "--device", "cpu", "--chunked-prefill-size", "-1",
        "--schedule-policy", "fcfs", "--disable-radix-cache", "--disable-overlap", "--max-prefill-tokens", "999",
    ])
    config = args.scheduler_config()
    assert config.chunked_prefill_size is None
    assert (config.schedule_policy, config.disable_radix_cache, config.enable_overlap) == ("fcfs", True, False)
    assert config.max_prefill_tokens == 999
    default = prepare_server_args(["--model-path", "m", "--device", "cpu"]).scheduler_config()
    assert default.chunked_prefill_size == 8192 and not default.disable_radix_cache
    assert not default.enable_overlap  # off on CPU unless asked for
    assert prepare_server_args(["--model-path", "m", "--device", "cpu", "--enable-cpu-overlap"]).scheduler_config().enable_overlap
    assert prepare_server_args(["--model-path", "m", "--device", "cuda"]).scheduler_config().enable_overlap


def test_multi_node_flags_are_checked():
    from runtime.server_args import ServerArgs

    with pytest.raises(ValueError, match="multiple of --nnodes"):
        ServerArgs(model_path="m", device="cpu", tp_size=3, nnodes=2, dist_init_addr="127.0.0.1:5000")
    with pytest.raises(ValueError, match="--dist-init-addr must be host:port"):
        ServerArgs(model_path="m", device="cpu", tp_size=2, nnodes=2, dist_init_addr="127.0.0.1")
    args = ServerArgs(model_path="m", device="cpu", tp_size=4, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:5000")
    assert list(args.local_tp_ranks()) == [2, 3]


def test_default_backend_on_cuda_follows_dtype_and_flashinfer(monkeypatch):
    import importlib.util

    from runtime.server_args import ServerArgs

    real_find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(
            importlib.util, "find_spec",
            lambda name, *a, installed=installed: (object() if installed else None) if name == "flashinfer" else real_find_spec(name, *a),
        )
        bf16 = ServerArgs(model_path="m", device="cuda", dtype="bfloat16").attention_backend
        fp32 = ServerArgs(model_path="m", device="cuda", dtype="float32").attention_backend
        assert (bf16, fp32) == (("flashinfer", "triton") if installed else ("triton", "triton"))
    assert ServerArgs(model_path="m", device="cpu").attention_backend == "cpu"


def test_tp_on_cuda_turns_cuda_graphs_off_with_one_warning(caplog):
    from runtime.device_defaults import cuda_graph_off_reason

    assert cuda_graph_off_reason("cuda", 1) is None
    assert cuda_graph_off_reason("cpu", 4) is None
    assert "--tp-size 2 on CUDA" in cuda_graph_off_reason("cuda", 2)

    with caplog.at_level("WARNING", logger="runtime.server_args"):
        args = ServerArgs(model_path="m", device="cuda", tp_size=2, attention_backend="triton")
    assert args.disable_cuda_graph
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA graphs disabled: " + cuda_graph_off_reason("cuda", 2)
    ]
    assert args.model_runner_config(tp_rank=1).disable_cuda_graph
    caplog.clear()
    with caplog.at_level("WARNING", logger="runtime.server_args"):
        assert ServerArgs(model_path="m", device="cuda", tp_size=2, disable_cuda_graph=True).disable_cuda_graph
        assert not ServerArgs(model_path="m", device="cuda", attention_backend="triton").disable_cuda_graph
        assert not ServerArgs(model_path="m", device="cpu", tp_size=2).disable_cuda_graph
    assert caplog.records == []  # nothing to say when the user's choice stands


def test_flashinfer_workspace_flag():
    from layers.attention.flashinfer_backend import DEFAULT_WORKSPACE_MB
    from model_executor.model_config import ModelRunnerConfig

    # One default in three places: the flag, the runner config, the backend.
    assert prepare_server_args(BASE).flashinfer_workspace_mb == DEFAULT_WORKSPACE_MB
    assert ModelRunnerConfig(model_path="m").flashinfer_workspace_mb == DEFAULT_WORKSPACE_MB
    args = prepare_server_args(BASE + ["--flashinfer-workspace-mb", "512"])
    assert args.model_runner_config().flashinfer_workspace_mb == 512
    with pytest.raises(ValueError, match="--flashinfer-workspace-mb must be >= 1, got 0"):
        prepare_server_args(BASE + ["--flashinfer-workspace-mb", "0"])


def test_child_processes_get_typed_configs_not_server_args() -> None:
    import pickle

    from managers.process_config import DetokenizerProcessConfig, SchedulerProcessConfig

    args = ServerArgs(model_path="m", device="cpu", tp_size=2, log_level="debug", dist_timeout=42,
                      enable_mixed_chunk=True)
    config = args.scheduler_process_config(1)
    assert isinstance(config, SchedulerProcessConfig)
    assert config.runner == args.model_runner_config(1) and config.runner.tp_rank == 1
    assert config.scheduler == args.scheduler_config() and config.scheduler.enable_mixed_chunk
    assert (config.tp_size, config.ranks_per_node, config.dist_timeout_s, config.log_level) == (2, 2, 42, "debug")
    assert config.tokenizer is not None and config.tokenizer.path == "m"
    assert pickle.loads(pickle.dumps(config)) == config  # it travels to the child pickled
    assert ServerArgs(model_path="m", device="cpu", skip_tokenizer_init=True).scheduler_process_config(0).tokenizer is None
    detok = args.detokenizer_process_config()
    assert isinstance(detok, DetokenizerProcessConfig) and detok.tokenizer == config.tokenizer
