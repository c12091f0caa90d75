"""Exported models on disk: finding them in a models folder and running their ONNX parts.

A models folder holds one sub-folder per model, each written by `sdfc export` (see
models_export/onnx_export.py for the layout). Sessions are created once per model and kept: the engine
is loaded once per instance and then serves many requests.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, OutOfMemoryError
from . import providers as providers_mod
from . import tiling
from .architectures import Architecture, check_distilled, check_prediction_type, find_architecture
from .lora import LoraSessions
from .memory import MemoryProfile, memory_profile
from .precision import Fp32Decoder, input_dtypes, typed_feeds
from .schedules import ModelSigmas, alphas_cumprod_from_config

log = logging.getLogger("sdfc.engine")

MANIFEST = "sdfc.json"
# onnxruntime's CPU layout transformer re-packs Conv weights from the model's own initializers, ignoring an
# override (measured with 1.31.1: an overridden Conv weight changed nothing): off where initializers are replaced.
OVERRIDE_BLOCKING_OPTIMIZERS = ("NchwcTransformer",)
# The text encoder's token-embedding initializer, as torch.onnx names CLIPTextModel's parameter.
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


# The devices whose sessions run through IO binding by default (OnnxModel.io_binding).
IO_BINDING_DEVICES = ("cpu", "cuda")

# How onnxruntime words a failed allocation (CPU arena, CUDA allocator, a C++ bad_alloc).
_ALLOCATION_FAILURE_WORDS = ("allocat", "bad_alloc", "out of memory")


def is_allocation_failure(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(w in str(exc).lower() for w in _ALLOCATION_FAILURE_WORDS)


@dataclass(frozen=True)
class ModelInfo:
    """What the API lists about a model (A1111's sd-models entry) and where it lives."""

    name: str
    path: Path
    sha256: str
    short_hash: str
    precision: str
    architecture: str
    prediction_type: str
    clip_skip_outputs: tuple[tuple[int, str], ...] = ((1, "last_hidden_state"),)
    unet_in_channels: int = 4  # 9: an inpainting UNet (latent + mask + masked-image latent)
    distilled: str | None = None  # "lcm" or "turbo": a few-step model meant for CFG 1 (architectures.DISTILLED)
    # Each component's declared precision (manifest `component_precision`; older exports: `precision` for all)
    # and the folders of fp32 twins of fp16 parts (manifest `fp32_fallback`: the VAE decoder's, precision.py).
    component_precision: tuple[tuple[str, str], ...] = ()
    fp32_fallback: tuple[tuple[str, str], ...] = ()
    # A `--target cuda` export (models_export/cuda_target.py): graphs fused offline ("graph_optimization":
    # "offline"), served without onnxruntime's extended and layout optimizations, and taking no LoRAs.
    target: str = "cpu"
    graph_optimization: str = "online"

    def precision_of(self, component: str) -> str:
        return dict(self.component_precision).get(component, self.precision)

    def fp32_fallback_of(self, component: str) -> str | None:
        return dict(self.fp32_fallback).get(component)

    @property
    def arch(self) -> Architecture:
        """The architecture table's entry (read_model_info has checked the name)."""
        return find_architecture(self.architecture, str(self.path))

    def clip_skip_problem(self, clip_skip: int) -> str | None:
        """Why this model cannot encode prompts at `clip_skip`, or None when it can."""
        outputs = dict(self.clip_skip_outputs)
        if clip_skip in outputs or not self.arch.clip_skip:
            return None  # SD 2.x and SDXL encode at a fixed layer: A1111 ignores the option for them, and so do we
        return (f"CLIP skip {clip_skip} is not available for model {self.name!r} (available: "
                f"{', '.join(map(str, sorted(outputs)))}; export with --clip-skip to add more)")

    @functools.cached_property
    def memory(self) -> MemoryProfile:
        """What a generation with this model costs in memory, read from its config files once: every request's
        check and every cache look-up with a byte bound asks (a changed folder is a new ModelInfo on refresh)."""
        return memory_profile(self.path, self.precision, dict(self.component_precision),
                              fp32_vae_retry=self.fp32_fallback_of("vae_decoder") is not None)

    @property
    def title(self) -> str:
        # A1111 titles are "<file name> [<short hash>]"; clients send either form back.
        return f"{self.name} [{self.short_hash}]"

    def matches(self, wanted: str) -> bool:
        wanted = wanted.strip()
        return wanted in (self.name, self.title, self.short_hash, self.sha256) or \
            wanted.split(" [")[0] == self.name


def read_model_info(path: Path) -> ModelInfo:
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{str(path)!r} is not an exported model: {MANIFEST} is missing") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{str(manifest_path)!r} is not valid JSON: {exc}") from None
    source = manifest.get("source", {})
    # An unknown family or prediction type is refused here, not run as SD 1.x ε (which gives garbage).
    where = f"{str(manifest_path)!r}"
    architecture = find_architecture(manifest.get("architecture", "sd1"), where).name
    return ModelInfo(
        name=manifest.get("name") or path.name, path=path,
        sha256=source.get("sha256", ""), short_hash=source.get("short_hash", "")[:10],
        precision=manifest.get("precision", "fp32"), architecture=architecture,
        prediction_type=check_prediction_type(manifest.get("prediction_type", "epsilon"), where),
        distilled=check_distilled(manifest.get("distilled"), where),
        clip_skip_outputs=tuple(sorted((int(k), v) for k, v in
                                       (manifest.get("clip_skip_outputs") or {"1": "last_hidden_state"}).items())),
        unet_in_channels=int(manifest.get("unet_in_channels", 4)),
        component_precision=tuple(sorted((manifest.get("component_precision") or {}).items())),
        fp32_fallback=tuple(sorted((manifest.get("fp32_fallback") or {}).items())),
        target=manifest.get("target", "cpu"), graph_optimization=manifest.get("graph_optimization", "online"),
    )


def scan_models(models_dir: str | Path) -> list[ModelInfo]:
    """Every exported model under `models_dir` (the folder itself may be a single model)."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise ModelNotFoundError(f"models folder {str(models_dir)!r} does not exist")
    if (models_dir / MANIFEST).is_file():
        return [read_model_info(models_dir)]
    # Hidden folders are exports still being staged (models_export writes `.<name>.partial-*` first).
    found = [read_model_info(p) for p in sorted(models_dir.iterdir())
             if not p.name.startswith(".") and (p / MANIFEST).is_file()]
    if not found:
        raise ModelNotFoundError(f"no exported model in {str(models_dir)!r} (no sub-folder has {MANIFEST})")
    return found


def load_tokenizer(info: ModelInfo):
    """The model's BPE tokenizer, unpadded and untruncated (chunking is A1111's, prompt_chunks.py)."""
    from tokenizers import Tokenizer

    # An SDXL refiner has only the second tokenizer (same vocabulary; chunks are padded per encoder).
    tokenizer_dir = "tokenizer" if (info.path / "tokenizer").is_dir() else "tokenizer_2"
    tokenizer = Tokenizer.from_file(str(info.path / tokenizer_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def session_device(session) -> tuple[str, int]:
    """Where `session` keeps its inputs and outputs, as IO binding names it: ("cuda", id) on the CUDA provider,
    ("cpu", 0) on the CPU (including a CUDA session that fell back to it); read once and kept on the session."""
    device = getattr(session, "sdfc_device", None)
    if device is None:
        options = session.get_provider_options().get(providers_mod.CUDA)
        device = ("cuda", int(options.get("device_id", 0))) if options is not None else ("cpu", 0)
        session.sdfc_device = device
    return device


def _contiguous(array: np.ndarray) -> np.ndarray:
    """`array` in C order, keeping its shape (np.ascontiguousarray makes a 0-d array 1-d: a scalar timestep)."""
    return array if array.flags.c_contiguous else np.array(array, order="C")


_shared_arena_registered = False


def _register_shared_cpu_arena(ort) -> None:
    global _shared_arena_registered
    if _shared_arena_registered:
        return
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # OrtArenaCfg(max_mem=0: no cap, arena_extend_strategy=1: grow by the requested size, defaults, defaults)
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, 1, -1, -1))
    _shared_arena_registered = True


class OnnxModel:
    """The four ONNX sessions of one model plus what the runtime must know about them."""

    circular = False  # True on the seamless view that tiled() returns

    def __init__(self, info: ModelInfo, device: str = "cpu", threads: int = 0,
                 cuda: providers_mod.CudaOptions | None = None, io_binding: bool | None = None):
        import onnxruntime as ort

        self.info = info
        self.device = device
        self.threads = threads
        # Sessions run through IO binding (inputs bound from the host or kept on the device, outputs allocated
        # on the device); None: the device's default (IO_BINDING_DEVICES).
        self.io_binding = (device in IO_BINDING_DEVICES) if io_binding is None else bool(io_binding)
        self.providers_asked = providers_mod.providers_for(device, cuda)  # raises for an unknown device
        missing = [c for c in info.arch.components if not (info.path / c / "model.onnx").is_file()]
        if missing:
            raise ModelLoadError(f"model {info.name!r} in {str(info.path)!r} is declared {info.architecture!r} "
                                 f"but lacks its component(s) {', '.join(missing)} (no model.onnx)")
        self.sessions = {c: self._session(ort, c, self._options(ort)) for c in info.arch.components}
        # The seamless (tiling) variants of TILED_COMPONENTS: built on the first tiled request only, since
        # they hold a second copy of those parts' prepacked weights; then kept beside the normal ones.
        self._tiled_sessions: dict | None = None
        self._tiled_lock = threading.Lock()
        self.providers = self.sessions["unet"].get_providers()
        # Every component's providers: onnxruntime falls back to the CPU per session, quietly.
        self.cpu_fallbacks = providers_mod.fallbacks({c: s.get_providers() for c, s in self.sessions.items()},
                                                     device)
        if self.cpu_fallbacks:
            log.warning("CUDA was asked for but onnxruntime runs %s of %s on the CPU: check the NVIDIA driver and "
                        "the image's CUDA / cuDNN libraries (README \"Which image\")",
                        ", ".join(self.cpu_fallbacks), info.name)
        log.info("model %s loaded (%s, providers %s)", info.name, info.precision, self.providers)
        # Every input is fed in its own dtype (precision.typed_feeds); an fp16 timestep is an older fp16 export's.
        if input_dtypes(self.sessions["unet"]).get("timestep") == np.float16:
            log.warning("model %s: its UNet takes the timestep as float16, which rounds fractional timesteps "
                        "(k-diffusion samplers); export it again for a float32 timestep", info.name)
        self.fp32_vae = Fp32Decoder(info.fp32_fallback_of("vae_decoder"))  # shared by this model's views
        self._timestep = self.sessions["unet"].get_inputs()[1]
        scheduler = json.loads((info.path / "scheduler" / "scheduler_config.json").read_text())
        self.sigmas = ModelSigmas(alphas_cumprod_from_config(scheduler))
        vae = json.loads((info.path / "vae_decoder" / "config.json").read_text())
        self.vae_scaling_factor = float(vae.get("scaling_factor", 0.18215))
        self.num_train_timesteps = int(scheduler.get("num_train_timesteps", 1000))
        self.tokenizer = load_tokenizer(info)
        self.embeddings = None  # EmbeddingVocabulary once set_embeddings ran (sdfc/engine/embeddings.py)
        self._embedding_table = None
        self._weight_maps = None
        self.loras = LoraSessions()  # LoRA-merged sessions of the last sets used (sdfc/engine/lora.py)

    def _options(self, ort):
        options = ort.SessionOptions()
        providers_mod.tune_session_options(options, self.device, self.threads)
        if self.device == "cpu":
            # Memory patterns pre-plan each run's buffers and keep them: +76 MB (UNet) and +116 MB (VAE) on
            # the second run of a 50 M-parameter model, for no measured speed gain (CPU bench findings). On CUDA
            # onnxruntime's default (on) stays: nothing was measured there.
            options.enable_mem_pattern = False
        if self.info.graph_optimization == "offline":
            # Fused offline: only the basic, provider-independent rewrites (constant folding) are left to do.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if self.device == "cpu":
            # One arena shared by every session of the process, growing only by what is asked for,
            # instead of one doubling arena per session.
            _register_shared_cpu_arena(ort)
            options.add_session_config_entry("session.use_env_allocators", "1")
        return options

    def _session(self, ort, component: str, options, circular: bool = False, disabled_optimizers=()):
        path = self.info.path / component / "model.onnx"
        if not path.is_file():
            raise ModelNotFoundError(f"model {self.info.name!r} lacks {str(path)!r}")
        kwargs = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
        try:
            if not circular:
                return ort.InferenceSession(str(path), options, providers=self.providers_asked, **kwargs)
            # The rewritten graph goes in as bytes; its weights still come from the data file beside `path`.
            graph, changed = tiling.circular_graph_bytes(path)
            options.add_session_config_entry(tiling.EXTERNAL_DATA_FOLDER_KEY, str(path.parent.resolve()))
            log.info("tiling: %d convolutions of %s/%s made circular", changed, self.info.name, component)
            return ort.InferenceSession(graph, options, providers=self.providers_asked, **kwargs)
        except tiling.TilingError as exc:
            raise ModelLoadError(f"cannot make {str(path)!r} seamless: {exc}") from None
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
            if circular and is_allocation_failure(exc):  # built during a job: that job fails, not the model
                raise OutOfMemoryError(f"not enough memory to load the seamless {str(path)!r}") from exc
            raise ModelLoadError(f"cannot load {str(path)!r}: {exc}") from None

    @property
    def tiled_resident(self) -> bool:
        """Whether the seamless sessions are built (and hold their memory)."""
        return self._tiled_sessions is not None

    def tiled(self) -> "OnnxModel":
        """This model with seamless UNet and VAE (A1111's tiling): a view sharing everything but those
        sessions, which are built on the first call and cached on this model."""
        if self.info.target == "cuda":  # tiling.py rewrites ONNX Conv nodes only, not the fused NhwcConv
            raise InvalidRequestError(f"seamless tiling is not supported on model {self.info.name!r}: it is a "
                                      "`--target cuda` export, whose fused NHWC convolutions cannot be made "
                                      "circular; export it with --target cpu for tiling")
        with self._tiled_lock:
            if self._tiled_sessions is None:
                import onnxruntime as ort

                self._tiled_sessions = {c: self._session(ort, c, self._options(ort), circular=True)
                                        for c in tiling.TILED_COMPONENTS}
        view = copy.copy(self)
        view.sessions = {**self.sessions, **self._tiled_sessions}
        view.circular = True
        return view

    def _run(self, component: str, feeds: dict, output: str | None = None, session=None) -> np.ndarray:
        """The first output (or `output`) of `component`, as float32 numpy."""
        session = session or self.sessions[component]
        name = output or session.get_outputs()[0].name
        return self._run_outputs(component, feeds, [name], session)[0].astype(np.float32)

    def _run_outputs(self, component: str, feeds: dict, names: list[str], session=None) -> list[np.ndarray]:
        """The outputs `names` of `component` as numpy, run through IO binding when `io_binding` is on.
        `feeds` holds numpy arrays (fed in each input's declared dtype, precision.typed_feeds) and, with IO
        binding, OrtValues from resident_inputs (bound as they are, already on the session's device)."""
        session = session or self.sessions[component]
        try:
            if not self.io_binding:
                return session.run(names, typed_feeds(session, feeds))
            return self._run_bound(session, feeds, names)
        except Exception as exc:  # onnxruntime's RuntimeException/Fail carry no type for "no memory"
            if is_allocation_failure(exc):
                raise OutOfMemoryError(f"not enough memory to run the {component} of {self.info.name!r}") from exc
            raise

    @staticmethod
    def _run_bound(session, feeds: dict, names: list[str]) -> list[np.ndarray]:
        import onnxruntime as ort

        device_type, device_id = session_device(session)
        binding = session.io_binding()
        arrays = {name: value for name, value in feeds.items() if not isinstance(value, ort.OrtValue)}
        for name, value in typed_feeds(session, arrays).items():
            # From host memory: onnxruntime copies it to the device during the run (on the CPU it reads it).
            binding.bind_cpu_input(name, _contiguous(value))
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
        for name in names:  # allocated by onnxruntime on the device at the run's shapes
            binding.bind_output(name, device_type, device_id)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()  # the samplers' numpy math needs them on the host

    def resident_inputs(self, component: str, arrays: dict[str, np.ndarray]) -> dict:
        """Inputs fed to many runs of `component` unchanged (the UNet's text conditioning across steps), each in
        its declared dtype: with IO binding, OrtValues copied once to the session's device; without, numpy."""
        session = self.sessions[component]
        typed = {name: _contiguous(value) for name, value in typed_feeds(session, arrays).items()}
        if not self.io_binding:
            return typed
        import onnxruntime as ort

        device_type, device_id = session_device(session)
        # On the CPU the OrtValue reads the array's own memory and keeps a reference to it.
        return {name: ort.OrtValue.ortvalue_from_numpy(value, device_type, device_id)
                for name, value in typed.items()}

    def token_embedding_table(self) -> np.ndarray:
        """CLIP's token-embedding table (vocabulary × width), read from the text encoder's file."""
        from .onnx_tensors import read_initializer
        return read_initializer(self.info.path / "text_encoder" / "model.onnx", TOKEN_EMBEDDING)

    def set_embeddings(self, vocabulary) -> None:
        """Let prompts use these textual-inversion embeddings: the text encoder's session is made again with its
        token-embedding table extended by their rows (an initializer override: the graph is unchanged)."""
        self._embedding_table = vocabulary.table(self.token_embedding_table()) if vocabulary else None
        self.sessions["text_encoder"] = self.session_with_initializers("text_encoder", {})
        self.embeddings = vocabulary

    def session_with_initializers(self, component: str, values: dict[str, np.ndarray], circular: bool = False):
        """A session of `component` with the named initializers replaced by `values` (LoRA merges, the extended
        token table): onnxruntime's initializer override, the graph file unchanged. The text encoder always
        carries the current embeddings' table."""
        import onnxruntime as ort

        if component == "text_encoder" and self._embedding_table is not None:
            values = {TOKEN_EMBEDDING: self._embedding_table, **values}
        options = self._options(ort)
        kept = []
        for name, array in values.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            options.add_initializer(name, value)
            kept.append(value)
        session = self._session(ort, component, options, circular=circular,
                                disabled_optimizers=OVERRIDE_BLOCKING_OPTIMIZERS)
        session.sdfc_initializers = kept  # the session reads this memory: it must live as long as the session
        return session

    def weight_maps(self) -> dict[str, dict]:
        """Per component, each PyTorch weight's initializer (the export's weights_map.json; {} if absent)."""
        if self.info.target == "cuda":
            raise InvalidRequestError(f"LoRAs are not supported on model {self.info.name!r}: it is a `--target cuda` "
                                      "export, whose fused graphs no longer hold each weight as one initializer "
                                      "(packed attention, NHWC convolutions); export it with --target cpu for LoRAs")
        if self._weight_maps is None:
            maps = {}
            for component in ("unet", "text_encoder"):
                path = self.info.path / component / "weights_map.json"
                if path.is_file():
                    maps[component] = json.loads(path.read_text())["weights"]
            self._weight_maps = maps
        return self._weight_maps

    def with_sessions(self, sessions: dict) -> "OnnxModel":
        """A view of this model with some sessions replaced (a LoRA set's), sharing everything else."""
        view = copy.copy(self)
        view.sessions = {**self.sessions, **sessions}
        return view

    def encode_tokens(self, input_ids: np.ndarray, clip_skip: int = 1) -> np.ndarray:
        """Hidden states; with CLIP skip N > 1, layer −N's output through the final layer norm (A1111)."""
        problem = self.info.clip_skip_problem(clip_skip)
        if problem:
            raise InvalidRequestError(problem)
        if not self.info.arch.clip_skip:
            clip_skip = 1  # the encoder's fixed layer, whatever the option says (A1111)
        output = dict(self.info.clip_skip_outputs)[clip_skip]
        return self._run("text_encoder", {"input_ids": input_ids.astype(np.int64)}, output)

    def encode_sdxl_tokens(self, component: str, input_ids: np.ndarray, pooled: bool):
        """An SDXL text encoder's penultimate hidden states, and its projected pooled output when `pooled`."""
        from .sdxl import POOLED_OUTPUT, penultimate_output

        names = [penultimate_output(self.sessions[component])] + ([POOLED_OUTPUT] if pooled else [])
        outs = self._run_outputs(component, {"input_ids": input_ids.astype(np.int64)}, names)
        return outs[0].astype(np.float32), (outs[1].astype(np.float32) if pooled else None)

    def unet(self, sample: np.ndarray, timestep: float, context: np.ndarray, **added_inputs) -> np.ndarray:
        """ε prediction. Fractional timesteps matter (k-diffusion): int64 graphs get them rounded.
        `added_inputs`: SDXL's text_embeds and time_ids, one row per sample row."""
        if self._timestep.type == "tensor(int64)":
            t = np.full((sample.shape[0],), round(timestep), dtype=np.int64)
        elif len(self._timestep.shape) == 0:
            t = np.asarray(timestep, dtype=np.float32)
        else:
            t = np.full((sample.shape[0],), timestep, dtype=np.float32)
        return self._run("unet", {"sample": sample, "timestep": t, "encoder_hidden_states": context, **added_inputs})

    def vae_decode(self, latents: np.ndarray) -> np.ndarray:
        """The raw decoded images; precision.decode_checked is the checked decode the pipeline uses."""
        return self._run("vae_decoder", {"latent_sample": latents / np.float32(self.vae_scaling_factor)})

    @property
    def has_fp32_vae_decoder(self) -> bool:
        return self.fp32_vae.folder is not None

    def vae_decode_fp32(self, latents: np.ndarray) -> np.ndarray:
        """vae_decode with the export's fp32 decoder (an fp16 VAE's fallback), seamless in a tiled view."""
        import onnxruntime as ort

        session = self.fp32_vae.session(
            lambda folder, circular: self._session(ort, folder, self._options(ort), circular=circular),
            self.circular)
        return self._run("vae_decoder", {"latent_sample": latents / np.float32(self.vae_scaling_factor)},
                         session=session)

    def vae_encode(self, images: np.ndarray) -> np.ndarray:
        """Latent of images in [-1, 1]: the posterior mean (deterministic), times the scaling factor."""
        params = self._run("vae_encoder", {"sample": images})
        return params[:, :4] * np.float32(self.vae_scaling_factor)
