"""`sdfc export ...`: build the tiny test model, export diffusers folders and single-file checkpoints to ONNX.

    sdfc export tiny --out DIR [--size tiny|mid] [--seed 0]
                     [--architecture sd1|sd2|sd2-v|sdxl|sdxl-refiner|inpaint] [--precision fp32|fp16]
                     [--keep-diffusers DIR] [--tokenizer-from DIR]
    sdfc export diffusers SRC --out DIR [--name N] [--precision fp32|fp16]
    sdfc export checkpoint FILE --out DIR [--config auto|sd15|tiny|PATH] [--name N] [--precision ...]
                     [--tokenizer-from DIR]
    sdfc export to-checkpoint DIFFUSERS_DIR --out FILE.safetensors

Every export takes `--no-validate` to skip optimum's ONNX-vs-PyTorch output check, which takes longer
than the export itself, `--no-clip-skip` to leave out the text encoder outputs for A1111's CLIP skip
(clip_skip.py), and `--distilled lcm|turbo` to flag a few-step distilled model whose folder does not say so.
The architecture (sd1, sd2, sdxl, sdxl-refiner) and prediction type (epsilon, v_prediction) are detected
from the source (architecture.py); anything else is refused. The output folder holds a manifest,
`sdfc.json` (see onnx_export.py). `--vae-precision fp32|fp16` sets the VAE's precision in an fp16 export
(default: fp32 for SDXL; fp16 with an fp32 fallback decoder for SD 1.x/2.x; see precision.py).
`--target cuda` fuses the SD 1.x/2.x graphs offline for onnxruntime's CUDA provider (cuda_target.py).

Bad input (a missing path, a file where a folder is expected, a folder that is not a diffusers model, an
unknown config, a checkpoint that is not SD 1.x) prints `error: ...` naming the offending path or value
and returns 2, without a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from models_export.onnx_export import PRECISIONS, ExportError
from models_export.tiny import TINY_ARCHITECTURES
from sdfc.engine.architectures import DISTILLED

log = logging.getLogger("sdfc.export")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage error (or --help)
        return int(exc.code or 0)
    try:
        return args.run(args)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfc export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny", help="build the random-weight test model from a seed and export it")
    tiny.add_argument("--out", type=Path, required=True, help="ONNX model folder to write")
    tiny.add_argument("--size", choices=("tiny", "mid"), default="tiny",
                      help="tiny: tests (0.8 M UNet parameters); mid: benchmarks (> 50 M)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--architecture", choices=TINY_ARCHITECTURES, default="sd1",
                      help="sd1 (default); sd2 (OpenCLIP text encoder, epsilon); sd2-v (SD 2.x v-prediction); "
                           "sdxl, sdxl-refiner; or inpaint: a 9-input-channel SD 1.x inpainting UNet (latent, "
                           "mask, masked-image latent)")
    tiny.add_argument("--name", help="model name in the manifest (default: <size>-sd)")
    tiny.add_argument("--keep-diffusers", type=Path, metavar="DIR",
                      help="build the diffusers model here and keep it (default: a temp folder)")
    _add_common(tiny, tokenizer=True)
    tiny.set_defaults(run=run_tiny)

    diffusers = sub.add_parser("diffusers", help="export a diffusers SD 1.x folder")
    diffusers.add_argument("src", type=Path, metavar="SRC")
    diffusers.add_argument("--out", type=Path, required=True)
    diffusers.add_argument("--name", help="model name in the manifest (default: the folder name)")
    _add_common(diffusers)
    diffusers.set_defaults(run=run_diffusers)

    ckpt = sub.add_parser("checkpoint", help="export an A1111-style single-file SD 1.x checkpoint")
    ckpt.add_argument("file", type=Path, metavar="FILE", help=".safetensors or .ckpt")
    ckpt.add_argument("--out", type=Path, required=True)
    ckpt.add_argument("--config", default="auto",
                      help="auto (default: the shipped config the weights fit), sd15, tiny, "
                           "or a folder of diffusers configs")
    ckpt.add_argument("--name", help="model name in the manifest (default: the file name without suffix)")
    ckpt.add_argument("--keep-diffusers", type=Path, metavar="DIR",
                      help="keep the intermediate diffusers model here (default: a temp folder)")
    _add_common(ckpt, tokenizer=True)
    ckpt.set_defaults(run=run_checkpoint)

    back = sub.add_parser("to-checkpoint",
                          help="write a diffusers SD 1.x folder as one single-file checkpoint")
    back.add_argument("src", type=Path, metavar="DIFFUSERS_DIR")
    back.add_argument("--out", type=Path, required=True, help="FILE.safetensors (or .ckpt)")
    back.set_defaults(run=run_to_checkpoint)
    return parser


def _add_common(parser: argparse.ArgumentParser, tokenizer: bool = False) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp16 for GPU serving; fp32 (default) for CPU")
    parser.add_argument("--vae-precision", choices=PRECISIONS, default=None,
                        help="the VAE's precision in an fp16 export (default: fp32 for SDXL, whose fp16 VAE "
                             "overflows; fp16 for SD 1.x/2.x, with an fp32 decoder beside it that the engine "
                             "retries with when it overflows, as A1111's automatic VAE revert)")
    parser.add_argument("--target", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: fuse the graphs offline with onnxruntime's transformer optimizer for its CUDA "
                             "provider (fused attention, GroupNorm, NHWC convolutions; see cuda_target.py); the "
                             "result needs onnxruntime-gpu and takes no LoRAs. cpu (default): plain graphs")
    parser.add_argument("--no-validate", dest="validate", action="store_false",
                        help="skip optimum's ONNX-vs-PyTorch output check (it takes longer than the export)")
    parser.add_argument("--distilled", choices=DISTILLED, default=None,
                        help="flag a distilled few-step model (lcm, turbo) in the manifest; an LCMScheduler "
                             "config is detected as lcm without it")
    parser.add_argument("--no-clip-skip", dest="clip_skip", action="store_false",
                        help="leave out the text encoder outputs clip_skip_2..clip_skip_L that A1111's CLIP "
                             "skip (option CLIP_stop_at_last_layers) needs; they are added by default")
    if tokenizer:
        parser.add_argument("--tokenizer-from", type=Path, metavar="DIR",
                            help="copy the CLIP vocabulary from this folder's tokenizer.json (e.g. an "
                                 "exported model's tokenizer/) instead of downloading the open-clip wheel")
        parser.add_argument("--clip-wheel-dir", type=Path, metavar="DIR",
                            help="folder holding (or receiving) the open-clip-torch wheel")


# ---------------------------------------------------------------- commands

def run_tiny(args: argparse.Namespace) -> int:
    from models_export import tiny
    from models_export.checkpoint import check_tokenizer_folder
    from models_export.onnx_export import check_output_folder, export_diffusers
    from models_export.progress import step

    check_output_folder(args.out)
    if args.tokenizer_from is not None:
        check_tokenizer_folder(args.tokenizer_from)
    _check_keep_folder(args.keep_diffusers)
    # The source name is fixed (not the build folder's), so the manifest does not depend on where we built.
    suffix = (f"-seed{args.seed}" if args.seed else "") + \
        (f"-{args.architecture}" if args.architecture != "sd1" else "")
    source_name = f"{args.size}sd{suffix}"
    _quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="sdfc-tiny-") as tmp:
        build_dir = args.keep_diffusers or Path(tmp) / source_name
        with step(f"building the {args.size} diffusers model from seed {args.seed} in {build_dir}"):
            tiny.build(build_dir, size=args.size, seed=args.seed, cache_dir=args.clip_wheel_dir,
                       tokenizer_from=args.tokenizer_from, architecture=args.architecture)
        export_diffusers(build_dir, args.out, name=args.name or f"{args.size}-sd{suffix}",
                         precision=args.precision, vae_precision=args.vae_precision, source_name=source_name,
                         validate=args.validate, clip_skip=args.clip_skip, distilled=args.distilled,
                         target=args.target)
    return 0


def run_diffusers(args: argparse.Namespace) -> int:
    from models_export.onnx_export import check_diffusers_folder, check_output_folder, export_diffusers

    check_diffusers_folder(args.src)
    check_output_folder(args.out)
    _quiet_libraries()
    export_diffusers(args.src, args.out, name=args.name, precision=args.precision, vae_precision=args.vae_precision,
                     validate=args.validate, clip_skip=args.clip_skip, distilled=args.distilled, target=args.target)
    return 0


def run_checkpoint(args: argparse.Namespace) -> int:
    from models_export.checkpoint import AUTO, check_checkpoint_file, check_tokenizer_folder, \
        checkpoint_to_diffusers, resolve_config
    from models_export.onnx_export import check_output_folder, export_diffusers, sha256_file
    from models_export.progress import step

    check_checkpoint_file(args.file)
    if args.config != AUTO:
        resolve_config(args.config)
    check_output_folder(args.out)
    if args.tokenizer_from is not None:
        check_tokenizer_folder(args.tokenizer_from)
    _check_keep_folder(args.keep_diffusers)
    _quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="sdfc-checkpoint-") as tmp:
        dst = args.keep_diffusers or Path(tmp) / args.file.stem
        checkpoint_to_diffusers(args.file, dst, config=args.config, tokenizer_from=args.tokenizer_from,
                                clip_wheel_dir=args.clip_wheel_dir)
        # A1111's "Model hash" is the sha256 of the whole file; its short form is the first 10 hex digits.
        with step(f"hashing {args.file}"):
            digest = sha256_file(args.file)
        export_diffusers(dst, args.out, name=args.name or args.file.stem, precision=args.precision,
                         vae_precision=args.vae_precision, source_sha256=digest, source_kind="single-file",
                         source_name=args.file.name, validate=args.validate, clip_skip=args.clip_skip,
                         distilled=args.distilled, target=args.target)
    return 0


def run_to_checkpoint(args: argparse.Namespace) -> int:
    from models_export.checkpoint import write_checkpoint
    from models_export.onnx_export import check_diffusers_folder

    check_diffusers_folder(args.src)
    _quiet_libraries()
    write_checkpoint(args.src, args.out)
    return 0


def _check_keep_folder(folder: Path | None) -> None:
    if folder is not None and folder.is_file():
        raise ExportError(f"--keep-diffusers {str(folder)!r} is a file, not a folder")


def _quiet_libraries() -> None:
    """Keep the console to our progress lines: tracer warnings and loader notices are not for users."""
    import warnings

    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
