"""Server settings: CLI flags and ATTNSERVE_* environment variables (pydantic-settings).

Precedence: a CLI flag, then the environment variable, then the default.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"   # every model this project ships
CONFIG_FILE = "config.json"
CHECKPOINT_FILES = (CONFIG_FILE, "model.safetensors", "tokenizer.json")   # what a checkpoint directory holds


def _list(value: Any) -> Any:
    """A list as a flag gives it (repeated), or as an environment variable: a JSON list, or
    comma-separated."""
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip().startswith("[") else [v for v in value.split(",") if v]
    return value


def checkpoint_dirs(path: Path) -> list[Path]:
    """A checkpoint directory, or the checkpoint directories inside one (sorted by name)."""
    if (path / CONFIG_FILE).is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / CONFIG_FILE).is_file()) if path.is_dir() else []
    if not found:
        missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
        raise ValueError(f"checkpoint {str(path)!r} is neither a checkpoint directory (it lacks "
                         f"{', '.join(missing)}) nor a directory of them")
    return found


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATTNSERVE_", extra="ignore")

    checkpoint: Annotated[list[Path], NoDecode, BeforeValidator(_list)] = Field(
        default_factory=lambda: [SHIPPED], min_length=1, description="a checkpoint directory (ours or HF Llama "
        "format) or a directory of them; repeat for several models, the first is the default "
        "(default: every shipped checkpoint)")
    model_name: Annotated[list[str], NoDecode, BeforeValidator(_list)] = Field(
        default_factory=list, description="served model names, one per checkpoint (default: each directory's name)")
    host: Literal["0.0.0.0", "127.0.0.1", "::"] = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=1024, le=65535)
    max_batch: int = Field(16, ge=1, le=256, description="KV-cache slots: requests decoded together")
    max_context: int | None = Field(None, ge=2, description="tokens per slot (default: the model's)")
    max_queue: int = Field(64, ge=0, le=100_000, description="requests allowed to wait for a slot; more get 429")
    max_attention_floats: int = Field(
        8_000_000, ge=0, description="largest attention payload one request may ask for (floats)")
    max_request_seconds: float = Field(
        600.0, gt=0, description="a request running longer than this is ended with an error event")
    stream_interval_ms: float = Field(
        5.0, ge=0, le=1000, description="after a stream's first token, tokens made within this many ms "
        "go out in one write (0: one write per step)")
    api_key: SecretStr | None = Field(None, description="require this key (Bearer or X-API-Key)")
    workers: int = Field(1, ge=1, le=64, description="inference worker processes (each its own engine)")
    api_servers: int | None = Field(None, ge=1, le=64, description="HTTP processes (default: workers)")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32", description="compute dtype of weights and activations (as vLLM's --dtype); auto: "
        "bfloat16 where the device computes it natively, else float32. float32 is the exact reference")
    quantization: Literal["none", "int8"] = Field(
        "none", description="int8: weight-only, per output channel, made at load (CPU only); the "
        "int8 kernel serves small batches, a dense GEMM over the dequantised weights large ones")
    kv_cache_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="KV-cache dtype (auto: the compute dtype)")
    decode_step: Literal["auto", "python"] = Field(
        "auto", description="auto: decode steps of up to the rows measured faster at load run as one "
        "native call (model/decode_step.py); python: every step through the layers in PyTorch "
        "(as vLLM's --enforce-eager)")
    transport: Literal["zmq", "mp"] = Field(
        "zmq", description="worker → HTTP transport: ZMQ (default) or LitServe's multiprocessing-manager queues")
    threads: int | None = Field(None, ge=1, description="torch threads per worker "
                                "(default: the usable cores less one per HTTP process, shared by the workers)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins (none by default)")
    max_body_bytes: int = Field(4_000_000, ge=1024, description="largest request body; larger gets 413")
    metrics_dir: Path | None = Field(None, description="prometheus multiprocess directory (default: a temp dir)")

    @property
    def torch_threads(self) -> int:
        """`threads`, or the CPUs this process may use (a container's cpuset, not the host's count)
        less one for each HTTP process, shared by the workers. The HTTP processes need a core of
        their own: an OpenMP thread spin-waits between parallel regions, so a worker with a thread
        on every core takes the CPU the HTTP side needs to send its tokens, and any core taken
        from the worker stalls each of its parallel regions."""
        if self.threads:
            return self.threads
        http = self.api_servers or self.workers
        return max(1, (len(os.sched_getaffinity(0)) - http) // self.workers)

    @model_validator(mode="after")
    def _names_fit(self):
        self.models()                     # a missing checkpoint or a name clash fails at start-up
        return self

    def models(self) -> dict[str, Path]:
        """Every served model: its name → its checkpoint directory, the default first."""
        dirs = [d for path in self.checkpoint for d in checkpoint_dirs(Path(path))]
        if self.model_name and len(self.model_name) != len(dirs):
            raise ValueError(f"{len(self.model_name)} model names for {len(dirs)} checkpoints "
                             f"({', '.join(map(str, dirs))}): give one --model-name per checkpoint, or none")
        names = self.model_name or [d.resolve().name for d in dirs]
        if len(set(names)) != len(names):
            raise ValueError(f"two served models would have the same name: {names}; use --model-name")
        return dict(zip(names, dirs))


def parse_args(argv: list[str] | None = None) -> Settings:
    """Settings from CLI flags over the environment. Every field is a flag: --max-batch 8."""
    parser = argparse.ArgumentParser(prog="attnserve", description="Serve a transformer and show where it looks.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if name == "cors_origins":
            parser.add_argument(flag, nargs="*", default=None, help=help_text)
        elif name in ("checkpoint", "model_name"):
            parser.add_argument(flag, action="append", default=None,
                                help=f"{help_text}; repeatable [env ATTNSERVE_{name.upper()}: comma-separated]")
        else:
            parser.add_argument(flag, default=None, help=f"{help_text} [env ATTNSERVE_{name.upper()}]")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Settings(**given)
