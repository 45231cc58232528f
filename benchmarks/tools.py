"""What the suite measures, each as a command line run in its own process tree on the same inputs.

| tool | what |
|---|---|
| ``floor`` | read every input byte, write + fsync the output's byte count ([`benchmarks.workers.floor`]) |
| ``streammerge-cpu`` / ``streammerge-cuda`` | ``python -m streammerge merge ... --device cpu|cuda --json`` |
| ``streammerge-cpu-null`` | the same with ``--sink null``: computed, not written (where the time goes) |
| ``naive`` | ``load_file`` x3 + float32 torch + ``save_file`` ([`benchmarks.workers.naive`]) |
| ``mergekit-bf16`` | ``mergekit-yaml`` task_arithmetic, mergekit's default dtype (the checkpoints' bf16) |
| ``mergekit-fp32`` | the same with ``dtype: float32`` (and ``out_dtype`` = the checkpoints' dtype) |

mergekit's task_arithmetic computes ``base + sum_i w_i * (model_i - base)``. With ``base_model`` = target, sft at
weight ``-alpha`` and grpo at weight ``+alpha`` and ``normalize: false`` (else it divides by the sum of weights,
which is 0 here) that is ``target - alpha*(sft - target) + alpha*(grpo - target) = target + alpha*(grpo - sft)``
([`mergekit_yaml`]). Checked on a tiny-qwen2 trio (mergekit 0.1.5): the ``dtype: float32`` output is byte-identical
to streammerge's and to a float32 torch merge; the default (bf16) output differs from both in 2.2% of elements,
every step being rounded to bf16.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .inputs import TrioInfo
from .machine import REPO_ROOT

# Peak total RSS as a multiple of one checkpoint's bytes, to skip a peer where it would exhaust memory (measured on
# the 2-core development machine, docs/hardware.md): naive 9.0 GB for 1.9 GB checkpoints (all three loaded,
# the output held until save_file); mergekit 4.1 GB for 1.9 GB (CPU, bf16) up to 11.5 GB for 4.0 GB (--cuda).
NAIVE_RAM_FACTOR = 4.7
MERGEKIT_RAM_FACTOR = 3.0
# Environment for mergekit: local paths only, never the network.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
_MERGEKIT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class Context:
    """Everything a tool's command line depends on."""

    trio: TrioInfo
    out_dir: Path
    config_dir: Path
    alpha: float
    chunk_size: str
    threads: int | None
    mergekit: str | None
    python: str = sys.executable


@dataclass(frozen=True)
class Tool:
    """One measured tool.

    Attributes:
        name (`str`): its label in the results.
        kind (`str`): "floor", "streammerge" or "peer".
        description (`str`): one line for the report.
        build (`Callable[[Context], list[str]]`): its command line.
        ram_factor (`float | None`): estimated peak RSS / checkpoint bytes; `None` when bounded by design.
        gpu (`bool`): whether it uses the GPU (GPU memory is then sampled).
        env (`dict[str, str]`): extra environment variables.
    """

    name: str
    kind: str
    description: str
    build: Callable[[Context], list[str]]
    ram_factor: float | None = None
    gpu: bool = False
    env: tuple[tuple[str, str], ...] = ()


def mergekit_yaml(target: str, sft: str, grpo: str, alpha: float, *, float32: bool, out_dtype: str = "BF16") -> str:
    """The mergekit config computing ``target + alpha * (grpo - sft)`` (see the module docstring).

    Args:
        target, sft, grpo (`str`): checkpoint directories.
        alpha (`float`): the vector's scale.
        float32 (`bool`): compute in float32 (``dtype: float32``) and write ``out_dtype``; else mergekit's default
            (the checkpoints' own dtype for every step).
        out_dtype (`str`, defaults to "BF16"): the checkpoints' dtype, written when computing in float32.

    Returns:
        `str`: YAML text (paths JSON-quoted, which YAML reads as double-quoted strings).
    """
    lines = [
        "# out = target + alpha * (grpo - sft) as task arithmetic over base_model = target:",
        "# target + (-alpha) * (sft - target) + alpha * (grpo - target); normalize: false (the weights sum to 0)",
        "merge_method: task_arithmetic",
        f"base_model: {json.dumps(target)}",
        "models:",
        f"  - model: {json.dumps(sft)}",
        "    parameters:",
        f"      weight: {-alpha!r}",
        f"  - model: {json.dumps(grpo)}",
        "    parameters:",
        f"      weight: {alpha!r}",
        "parameters:",
        "  normalize: false",
    ]
    if float32:
        lines += ["dtype: float32", f"out_dtype: {_MERGEKIT_DTYPES[out_dtype]}"]
    return "\n".join(lines) + "\n"


def _floor(ctx: Context) -> list[str]:
    return [
        ctx.python,
        "-m",
        "benchmarks.workers",
        "floor",
        "--out-file",
        str(ctx.out_dir / "floor.bin"),
        "--out-bytes",
        str(ctx.trio.bytes_out),
        *ctx.trio.files,
    ]


def _streammerge(device: str, sink: str = "disk") -> Callable[[Context], list[str]]:
    def build(ctx: Context) -> list[str]:
        t = ctx.trio.trio
        argv = [ctx.python, "-m", "streammerge", "merge", str(t.target), str(t.sft), str(t.grpo)]
        argv += ["-o", str(ctx.out_dir), "--device", device, "--alpha", repr(ctx.alpha), "--json", "--quiet"]
        argv += ["--chunk-size", ctx.chunk_size, "--sink", sink]
        if ctx.threads:
            argv += ["--threads", str(ctx.threads)]
        return argv

    return build


def _naive(ctx: Context) -> list[str]:
    t = ctx.trio.trio
    argv = [ctx.python, "-m", "benchmarks.workers", "naive", str(t.target), str(t.sft), str(t.grpo), str(ctx.out_dir)]
    return argv + ["--alpha", repr(ctx.alpha)]


def _mergekit(float32: bool, cuda: bool) -> Callable[[Context], list[str]]:
    def build(ctx: Context) -> list[str]:
        if ctx.mergekit is None:
            raise RuntimeError("mergekit is not installed")
        t = ctx.trio.trio
        text = mergekit_yaml(
            str(t.target), str(t.sft), str(t.grpo), ctx.alpha, float32=float32, out_dtype=ctx.trio.dtype
        )
        ctx.config_dir.mkdir(parents=True, exist_ok=True)
        config = ctx.config_dir / f"{ctx.trio.label}-mergekit-{'fp32' if float32 else 'bf16'}.yml"
        config.write_text(text)
        return [ctx.mergekit, str(config), str(ctx.out_dir), *(["--cuda"] if cuda else [])]

    return build


FLOOR = Tool("floor", "floor", "read every input byte, write + fsync the output's bytes", _floor)
STREAMMERGE_CPU = Tool("streammerge-cpu", "streammerge", "streammerge merge --device cpu", _streammerge("cpu"))
STREAMMERGE_CPU_NULL = Tool(
    "streammerge-cpu-null",
    "streammerge-null",
    "streammerge merge --device cpu --sink null (everything computed, output discarded: the pipeline without writes)",
    _streammerge("cpu", sink="null"),
)
STREAMMERGE_CUDA = Tool(
    "streammerge-cuda", "streammerge", "streammerge merge --device cuda", _streammerge("cuda"), gpu=True
)
NAIVE = Tool("naive", "peer", "load_file x3 + float32 torch + save_file", _naive, ram_factor=NAIVE_RAM_FACTOR)
MERGEKIT_BF16 = Tool(
    "mergekit-bf16",
    "peer",
    "mergekit-yaml task_arithmetic, default dtype (bf16 steps)",
    _mergekit(float32=False, cuda=False),
    ram_factor=MERGEKIT_RAM_FACTOR,
    env=tuple(OFFLINE_ENV.items()),
)
MERGEKIT_FP32 = Tool(
    "mergekit-fp32",
    "peer",
    "mergekit-yaml task_arithmetic, dtype: float32",
    _mergekit(float32=True, cuda=False),
    ram_factor=MERGEKIT_RAM_FACTOR,
    env=tuple(OFFLINE_ENV.items()),
)
MERGEKIT_BF16_CUDA = Tool(
    "mergekit-bf16-cuda",
    "peer",
    "mergekit-yaml --cuda, default dtype",
    _mergekit(float32=False, cuda=True),
    ram_factor=MERGEKIT_RAM_FACTOR,
    gpu=True,
    env=tuple(OFFLINE_ENV.items()),
)
PEERS = ("naive", "mergekit")


def find_mergekit(explicit: str | None) -> str | None:
    """``mergekit-yaml``: the path given (or "none"), else the one on PATH, else `None`."""
    if explicit:
        if explicit.lower() == "none":
            return None
        return explicit if Path(explicit).exists() else shutil.which(explicit)
    return shutil.which("mergekit-yaml")


def mergekit_version(mergekit_yaml_path: str) -> str | None:
    """mergekit's version, asked of the Python beside ``mergekit-yaml`` (its own environment)."""
    exe = Path(mergekit_yaml_path)
    candidates = [exe.parent / "python", exe.parent / "python3"]
    try:
        shebang = exe.read_text(errors="replace").splitlines()[0]
        if shebang.startswith("#!"):
            candidates.append(Path(shebang[2:].strip().split()[0]))
    except (OSError, IndexError):
        pass
    code = "import importlib.metadata as m; print(m.version('mergekit'))"
    for python in candidates:
        if python.exists():
            try:
                done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if done.returncode == 0:
                return done.stdout.strip()
    return None


def select_tools(
    peers: list[str], mergekit: str | None, gpu: dict, null_sink: bool = True
) -> tuple[list[Tool], dict[str, str]]:
    """The tools to run and, for the ones left out, why.

    Args:
        peers (`list[str]`): subset of [`PEERS`].
        mergekit (`str | None`): path of ``mergekit-yaml``, `None` when not installed.
        gpu (`dict`): [`benchmarks.machine.gpu_info`].
        null_sink (`bool`, defaults to `True`): also run streammerge with ``--sink null``.
    """
    tools = [FLOOR, STREAMMERGE_CPU] + ([STREAMMERGE_CPU_NULL] if null_sink else [])
    absent: dict[str, str] = {}
    cuda = bool(gpu.get("cuda"))
    if cuda:
        tools.append(STREAMMERGE_CUDA)
    else:
        absent["streammerge-cuda"] = str(gpu.get("why", "no CUDA GPU available"))
    if "naive" in peers:
        tools.append(NAIVE)
    if "mergekit" in peers:
        if mergekit is None:
            absent["mergekit"] = "not installed (give --mergekit PATH/TO/mergekit-yaml or put it on PATH)"
        else:
            tools += [MERGEKIT_BF16, MERGEKIT_FP32] + ([MERGEKIT_BF16_CUDA] if cuda else [])
    return tools, absent


def clear(path: Path) -> None:
    """Remove a previous output (file or directory) so a tool starts from an empty place."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def repo_cwd() -> Path:
    """Where tool commands run: the repository root, so ``python -m benchmarks.workers`` imports."""
    return REPO_ROOT
