"""`sdfc train lora …` / `sdfc train embedding …`: training on the command line (needs torch, diffusers, peft)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..jobs import training_requests as tasks


def _bounded(kind, low, high):
    def parse(text: str):
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="sdfc train", description=__doc__)
    sub = root.add_subparsers(dest="what", required=True)
    lora = sub.add_parser("lora", help="train a LoRA (SD 1.x) and write it as a kohya-style .safetensors")
    lora.add_argument("--base", type=Path, required=True, help="the model in diffusers form (a folder)")
    lora.add_argument("--images", type=Path, required=True, help="images, with a caption .txt beside each")
    lora.add_argument("--out", type=Path, required=True, help="the .safetensors to write (into your LoRA folder)")
    lora.add_argument("--prompt", help="the caption of images without a .txt")
    lora.add_argument("--rank", type=_bounded(int, 1, tasks.MAX_RANK), default=8)
    lora.add_argument("--alpha", type=_bounded(float, 1e-6, 1024), default=None, help="default: the rank")
    lora.add_argument("--lr", type=_bounded(float, 1e-9, 1), default=1e-4, help="the UNet's learning rate")
    lora.add_argument("--te-lr", type=_bounded(float, 1e-9, 1), default=None,
                      help="also train the text encoder, at this rate")
    lora.add_argument("--steps", type=_bounded(int, 1, tasks.MAX_STEPS), default=500)
    lora.add_argument("--resolution", type=_bounded(int, 8, tasks.MAX_RESOLUTION), default=512)
    lora.add_argument("--batch-size", type=_bounded(int, 1, tasks.MAX_BATCH), default=1)
    lora.add_argument("--seed", type=_bounded(int, 0, 2**32 - 1), default=0)
    lora.add_argument("--no-buckets", action="store_true", help="square crops instead of aspect-ratio buckets")
    lora.add_argument("--noise-offset", type=_bounded(float, 0, 1), default=0.0)
    lora.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when present)")
    emb = sub.add_parser("embedding", help="train a textual-inversion embedding (SD 1.x), A1111's .safetensors")
    emb.add_argument("--base", type=Path, required=True, help="the model in diffusers form (a folder)")
    emb.add_argument("--images", type=Path, required=True, help="images, with a caption .txt beside each "
                     "([name] or the embedding's name marks where it goes)")
    emb.add_argument("--out", type=Path, required=True, help="<name>.safetensors (into your embeddings folder)")
    emb.add_argument("--prompt", help="the caption of images without a .txt")
    emb.add_argument("--init-text", default="*", help="the words whose token vectors start it")
    emb.add_argument("--vectors", type=_bounded(int, 1, 75), default=1, help="vectors per token")
    emb.add_argument("--lr", type=_bounded(float, 1e-9, 1), default=5e-3)
    emb.add_argument("--steps", type=_bounded(int, 1, tasks.MAX_STEPS), default=500)
    emb.add_argument("--resolution", type=_bounded(int, 8, tasks.MAX_RESOLUTION), default=512)
    emb.add_argument("--batch-size", type=_bounded(int, 1, tasks.MAX_BATCH), default=1)
    emb.add_argument("--seed", type=_bounded(int, 0, 2**32 - 1), default=0)
    emb.add_argument("--no-buckets", action="store_true", help="square crops instead of aspect-ratio buckets")
    emb.add_argument("--device", default=None)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .dataset import DatasetError
    from .lora_trainer import TrainingError

    out = args.out if args.out.suffix == ".safetensors" else args.out.with_suffix(".safetensors")
    common = dict(base=args.base, images=args.images, output=out, prompt=args.prompt, learning_rate=args.lr,
                  steps=args.steps, resolution=args.resolution, batch_size=args.batch_size, seed=args.seed,
                  buckets=not args.no_buckets, device=args.device)
    if args.what == "embedding":
        from .embedding_trainer import EmbeddingTrainingConfig, train_embedding
        config, train = EmbeddingTrainingConfig(init_text=args.init_text, num_vectors=args.vectors,
                                                **common), train_embedding
        use = out.stem
    else:
        from .lora_trainer import LoraTrainingConfig, train_lora
        config, train = LoraTrainingConfig(rank=args.rank, alpha=args.alpha, text_encoder_lr=args.te_lr,
                                           noise_offset=args.noise_offset, **common), train_lora
        use = f"<lora:{out.stem}:1>"
    every = max(1, args.steps // 20)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss:.5f}", flush=True)

    try:
        result = train(config, progress)
    except (TrainingError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.path} (final loss {result.final_loss:.5f}); use it in a prompt as {use}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
