"""Configuration from the environment (FC passes function configuration as environment variables)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .fc.gateway import running_in_fc
from .pricing import Pricing

if TYPE_CHECKING:  # the engine is imported only where CUDA options are set (_cuda_options)
    from .engine.providers import CudaOptions

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MODELS_DIR = REPO_ROOT / "tests" / "fixtures" / "models"


class ConfigError(ValueError):
    """Configuration that must stop the server from starting; the message says what to change."""


def parse_auth(value: str | None) -> dict[str, str]:
    """`user:pass[,user2:pass2]` → {user: pass}. Passwords may contain ':' (split at the first one)."""
    users: dict[str, str] = {}
    for entry in (value or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"SDFC_AUTH entry {user or entry!r} must look like user:password")
        users[user] = password
    return users


def password_problem(password: str) -> str | None:
    """The original service's policy: 8–30 characters, at least three of upper, lower, digit, symbol."""
    if not 8 <= len(password) <= 30:
        return "must be 8 to 30 characters long"
    classes = [r"[A-Z]", r"[a-z]", r"[0-9]", r"[^A-Za-z0-9]"]
    if sum(bool(re.search(c, password)) for c in classes) < 3:
        return "must mix at least three of: upper case, lower case, digits, symbols"
    return None


def _number(env: dict, name: str, default, kind=int):
    """An optional numeric variable; a malformed one stops the start with a message naming it."""
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return kind(raw)
    except ValueError:
        wanted = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name} must be {wanted}, got {raw!r}") from None


def _int(env: dict, name: str, default: int) -> int:
    return _number(env, name, default, int)


def _float(env: dict, name: str, default: float) -> float:
    return _number(env, name, default, float)


CUDA_VARIABLES = ("SDFC_CUDNN_CONV_ALGO_SEARCH", "SDFC_GPU_MEM_LIMIT_MB", "SDFC_CUDA_DEVICE_ID")


def _cuda_options(env: dict):
    """The CUDA execution provider's options from SDFC_CUDNN_CONV_ALGO_SEARCH (HEURISTIC | EXHAUSTIVE | DEFAULT),
    SDFC_GPU_MEM_LIMIT_MB and SDFC_CUDA_DEVICE_ID; None when
    none is set (the engine's defaults), so that functions without the engine (web, records) never import it."""
    if not any(env.get(name) for name in CUDA_VARIABLES):
        return None
    from .engine.providers import CudaOptions

    limit = _int(env, "SDFC_GPU_MEM_LIMIT_MB", 0)
    try:
        return CudaOptions(device_id=_int(env, "SDFC_CUDA_DEVICE_ID", 0),
                           cudnn_conv_algo_search=(env.get("SDFC_CUDNN_CONV_ALGO_SEARCH") or "HEURISTIC").upper(),
                           gpu_mem_limit_mb=limit or None)
    except ValueError as exc:
        raise ConfigError(f"CUDA options: {exc}") from None


def _bytes(env: dict, name: str, default: int | None) -> int | None:
    """A byte count, plain or with a K/M/G/T suffix (binary: 4G = 4 GiB)."""
    from .engine.memory import parse_bytes

    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return parse_bytes(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a byte count such as 4G or 512M, got {raw!r}") from None


def _mebibytes(env: dict, name: str) -> int | None:
    """A size in MiB (2^20 bytes) → bytes; unset or 0: None (no bound)."""
    value = _float(env, name, None)
    if value is None:
        return None
    if not 0 <= value < float("inf"):  # NaN fails too
        raise ConfigError(f"{name} must be a number of MiB of at least 0, got {env.get(name)!r}")
    return int(value * 2**20) or None


def _pricing(env: dict) -> Pricing:
    base = Pricing()
    rate = env.get("SDFC_PRICE_GPU_CU_PER_GB_S")
    return Pricing(gpu_type=env.get("SDFC_GPU_TYPE") or base.gpu_type,
                   gpu_memory_gb=_float(env, "SDFC_GPU_MEMORY_GB", base.gpu_memory_gb),
                   vcpu=_float(env, "SDFC_VCPU", base.vcpu),
                   memory_gb=_float(env, "SDFC_MEMORY_GB", base.memory_gb),
                   cu_price=_float(env, "SDFC_PRICE_PER_CU", base.cu_price),
                   currency=env.get("SDFC_PRICE_CURRENCY") or base.currency,
                   gpu_cu_per_gb_s=_float(env, "SDFC_PRICE_GPU_CU_PER_GB_S", None) if rate else None)


@dataclass
class Settings:
    auth: dict[str, str] = field(default_factory=dict)
    models_dir: Path = TINY_MODELS_DIR
    embeddings_dir: Path | None = None  # textual-inversion .safetensors files (A1111's embeddings/ folder)
    lora_dir: Path | None = None        # LoRA .safetensors files (A1111's models/Lora folder)
    training_dir: Path | None = None    # LoRA training: base models and image folders a request may name
    outputs_dir: Path = Path("data/outputs")
    database_url: str = "sqlite:///data/sdfc.db"
    dispatch: str = "local"          # local | fc3 | fc2 | fc2-open | off
    spool_dir: Path = Path("data/spool")
    # The records function, for fc3/fc2 dispatch (FC sets FC_ACCOUNT_ID and FC_REGION in every function).
    records_function: str = "sdfc-records"
    records_service: str = "sdfc"    # fc2 / fc2-open only: FC 2.0 functions live in a service
    records_qualifier: str | None = None
    fc_endpoint: str | None = None
    fc_account_id: str | None = None
    fc_region: str | None = None
    # True in an FC instance (FC_INSTANCE_ID and FC_FUNCTION_NAME set): only there are x-fc-* request headers
    # FC's own (sdfc/fc/gateway.py); elsewhere they are the client's and never believed.
    in_fc: bool = False
    fc_instance_id: str | None = None  # FC_INSTANCE_ID: names this instance's own folder of a shared (NAS) spool
    # Events above this travel by key. FC accepts 128 KB async bodies, but a failed invocation's body goes on to
    # the onFailure destination, an MNS queue whose messages are capped at 64 KB together with FC's context
    # and the response: keep the event well below that, or the dead letter itself is lost.
    fc_async_body_limit: int = 48 * 1024
    dispatch_queue_size: int = 1000
    dispatch_max_backoff_s: float = 30.0
    dispatch_drain_s: float = 5.0
    device: str = "cpu"
    cuda: CudaOptions | None = None  # SDFC_CUDNN_CONV_ALGO_SEARCH, SDFC_GPU_MEM_LIMIT_MB, ...; None: defaults
    default_model: str | None = None
    styles_file: Path | None = None
    cors_origins: tuple[str, ...] = ()
    docs_open: bool = True
    # Limits: a request beyond one gets a 4xx naming it. FC caps synchronous bodies at 32 MB.
    # None: derived per model from the memory budget (the largest image one job can afford).
    max_pixels: int | None = None
    # Bytes one job may use; None: measured (cgroup limit, `ulimit -v`, MemAvailable, or the GPU's free
    # memory), 0: no memory check. See sdfc/engine/memory.py for the per-model estimate.
    memory_budget: int | None = None
    # Bytes all loaded models may hold together (SDFC_MODEL_MEMORY_MB); None: no byte bound, only the count
    # bound of the option sd_checkpoint_cache (sdfc/engine/model_cache.py).
    model_memory_bytes: int | None = None
    max_steps: int = 150
    max_images: int = 16
    max_body_bytes: int = 32 * 1024 * 1024
    # `prompt text` in generated_images holds 65,535 bytes (UTF-8): a longer prompt could not be recorded
    # verbatim, so it is refused up front.
    max_prompt_bytes: int = 65_535
    # Generation requests running or waiting for the engine at once; one more is a 503 with Retry-After, so
    # that waiting generations never take every request thread (the server has 16: SDFC_THREADS).
    max_queued_jobs: int = 12
    # Jobs (sdfc/jobs): who runs queued tasks here (`local`: this process's worker; `off`: none, as in a
    # function that only answers), how long a silent instance keeps a task, how often progress is written.
    task_worker: str = "local"
    task_function: str = "sdfc-api"    # fc: the function whose async invocations run tasks (sd-api itself)
    training_function: str | None = None  # fc: the GPU function with torch that runs train tasks (functions/train)
    task_lease_s: float = 30.0
    task_heartbeat_s: float = 0.25
    admins: tuple[str, ...] = ()       # users who see and cancel everyone's tasks and records
    pricing: Pricing = field(default_factory=Pricing)

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("SDFC_DATA_DIR", "data"))
        return cls(
            auth=parse_auth(env.get("SDFC_AUTH")),
            models_dir=Path(env.get("SDFC_MODELS_DIR") or TINY_MODELS_DIR),
            embeddings_dir=Path(env.get("SDFC_EMBEDDINGS_DIR") or data_dir / "embeddings"),
            lora_dir=Path(env.get("SDFC_LORA_DIR") or data_dir / "loras"),
            training_dir=Path(env.get("SDFC_TRAINING_DIR") or data_dir / "training"),
            outputs_dir=Path(env.get("SDFC_OUTPUTS_DIR") or data_dir / "outputs"),
            database_url=env.get("SDFC_DATABASE_URL") or f"sqlite:///{data_dir / 'sdfc.db'}",
            dispatch=(env.get("SDFC_DISPATCH") or "local").strip().lower(),
            spool_dir=Path(env.get("SDFC_SPOOL_DIR") or data_dir / "spool"),
            records_function=env.get("SDFC_RECORDS_FUNCTION") or cls.records_function,
            records_service=env.get("SDFC_RECORDS_SERVICE") or cls.records_service,
            records_qualifier=env.get("SDFC_RECORDS_QUALIFIER") or None,
            fc_endpoint=env.get("SDFC_FC_ENDPOINT") or None,
            fc_account_id=env.get("FC_ACCOUNT_ID") or None,
            fc_region=env.get("FC_REGION") or None,
            in_fc=running_in_fc(env),
            fc_instance_id=env.get("FC_INSTANCE_ID") or None,
            fc_async_body_limit=_int(env, "SDFC_FC_ASYNC_BODY_LIMIT", cls.fc_async_body_limit),
            dispatch_queue_size=_int(env, "SDFC_DISPATCH_QUEUE", cls.dispatch_queue_size),
            dispatch_max_backoff_s=_float(env, "SDFC_DISPATCH_MAX_BACKOFF_S", cls.dispatch_max_backoff_s),
            dispatch_drain_s=_float(env, "SDFC_DISPATCH_DRAIN_S", cls.dispatch_drain_s),
            device=env.get("SDFC_DEVICE", "cpu"),
            cuda=_cuda_options(env),
            default_model=env.get("SDFC_DEFAULT_MODEL") or None,
            styles_file=Path(env["SDFC_STYLES_FILE"]) if env.get("SDFC_STYLES_FILE") else None,
            cors_origins=tuple(o.strip().rstrip("/") for o in env.get("SDFC_CORS_ORIGINS", "").split(",")
                               if o.strip()),
            docs_open=env.get("SDFC_DOCS_AUTH", "0") not in ("1", "true", "yes"),
            max_pixels=_int(env, "SDFC_MAX_PIXELS", cls.max_pixels),
            memory_budget=_bytes(env, "SDFC_MEMORY_BUDGET", cls.memory_budget),
            model_memory_bytes=_mebibytes(env, "SDFC_MODEL_MEMORY_MB"),
            max_steps=_int(env, "SDFC_MAX_STEPS", cls.max_steps),
            max_images=_int(env, "SDFC_MAX_IMAGES", cls.max_images),
            max_body_bytes=_int(env, "SDFC_MAX_BODY_BYTES", cls.max_body_bytes),
            max_prompt_bytes=_int(env, "SDFC_MAX_PROMPT_BYTES", cls.max_prompt_bytes),
            max_queued_jobs=_int(env, "SDFC_MAX_QUEUED_JOBS", cls.max_queued_jobs),
            task_worker=(env.get("SDFC_TASK_WORKER") or "local").strip().lower(),
            task_function=env.get("SDFC_TASK_FUNCTION") or env.get("FC_FUNCTION_NAME") or cls.task_function,
            training_function=env.get("SDFC_TRAINING_FUNCTION") or None,
            task_lease_s=_float(env, "SDFC_TASK_LEASE_S", cls.task_lease_s),
            task_heartbeat_s=_float(env, "SDFC_TASK_HEARTBEAT_S", cls.task_heartbeat_s),
            admins=tuple(u.strip() for u in env.get("SDFC_ADMINS", "").split(",") if u.strip()),
            pricing=_pricing(env),
        )

    def check_listen(self, host: str) -> None:
        """Refuse to serve beyond loopback without credentials, and anywhere with weak ones."""
        loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
        if not loopback and not self.auth:
            raise ConfigError(f"refusing to listen on {host} without SDFC_AUTH (set user:password)")
        for user, password in self.auth.items():
            problem = password_problem(password)
            if problem:
                raise ConfigError(f"the password of user {user!r} {problem}")
