"""Training your own LoRAs and embeddings: torch, diffusers and peft, outside the serving package's import graph.

Only `sdfc train` and the training child process (`python -m sdfc.training run CONFIG.json`, which the task runner
starts locally and the training function starts in FC) import this room; no serving composition does (a test
holds them to it). It reads a base model in diffusers form (the ONNX export cannot be trained) and a folder of
captioned images, and writes a kohya-style LoRA `.safetensors` into the LoRA folder that the engine
(sdfc/engine/lora.py) reads, or an A1111 textual-inversion embedding into the embeddings folder.

- dataset.py: images, captions and aspect-ratio buckets (PIL and numpy only)
- kohya.py: PEFT weights to kohya keys, and the `ss_*` metadata the ecosystem reads
- lora_trainer.py: the LoRA training loop and the loss both trainers use (torch)
- embedding_trainer.py: textual inversion (torch)
- child.py: one run in its own process, its progress as JSON lines on stdout (sdfc/jobs/training_process.py reads them)
- function.py: the FC training function: runs the train tasks sd-api hands to it by async invocation
- cli.py: `sdfc train lora|embedding`

What the serving side needs without torch lives there: the task requests, their validation and path confinement
(sdfc/jobs/training_requests.py), the child's driver (sdfc/jobs/training_process.py) and A1111's create/train embedding
routes (sdfc/api/training.py).
"""
