"""What an SDXL export needs beyond an SD 1.x one (onnx_export.py calls these).

optimum exports SDXL pipelines as they are: `text_encoder` (CLIP ViT-L) and `text_encoder_2` (OpenCLIP bigG,
with the projected pooled output `text_embeds`) with every layer's hidden state as `hidden_states.N`, of which
the engine reads the penultimate as SDXL does; the UNet takes `text_embeds` and `time_ids` besides the usual
inputs. The refiner has only the second encoder and tokenizer. What is left to do here: which folders a source
must hold, and the second tokenizer written as one tokenizer.json like the first.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

SDXL_FAMILY = ("sdxl", "sdxl-refiner")
SD_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
REFINER_FOLDERS = ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
SDXL_FOLDERS = SD_FOLDERS + ("text_encoder_2", "tokenizer_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")


def required_folders(src: Path) -> tuple[str, ...]:
    """The component folders a diffusers source must have: an SDXL refiner has only the second encoder."""
    src = Path(src)
    if (src / "text_encoder_2").is_dir():
        return SDXL_FOLDERS if (src / "text_encoder").is_dir() else REFINER_FOLDERS
    return SD_FOLDERS


def write_fast_tokenizers(src: Path, out: Path, write_config) -> None:
    """Keep only the fast tokenizer of each tokenizer folder (`tokenizer/`, SDXL's `tokenizer_2/`) and name the
    fast class in model_index.json, so that diffusers loads the export as it is. `tokenizer_2` pads with its own
    pad token (OpenCLIP's 0), which the fast tokenizer keeps."""
    from transformers import CLIPTokenizerFast

    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    for folder in TOKENIZERS:
        if not (Path(src) / folder).is_dir():
            continue
        fast = CLIPTokenizerFast.from_pretrained(str(Path(src) / folder))
        shutil.rmtree(out / folder, ignore_errors=True)
        fast.save_pretrained(str(out / folder), legacy_format=False)
        index[folder] = ["transformers", "CLIPTokenizerFast"]
    write_config(index_path, index)
