"""Tiny random vision-language checkpoints for tests, built with transformers (no download), once per cache.

``tiny_gemma3_vlm_checkpoint()``: ``Gemma3ForConditionalGeneration`` with a 2-layer Gemma 3 text model (SmolLM2's
tokenizer and chat template, like ``tests.models.tiny_random_checkpoint``) and a 2-layer SigLIP vision tower on
64x64 images (8x8 patches pooled to 16 image tokens). The pinned converter converts both halves
(``--mmproj``) and ``llama-mtmd-cli`` loads the projector.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.models import FIXTURE_VERSION, _build_once, smollm2_checkpoint

VLM_NAME = "tiny-gemma3-vlm"
IMAGE_SIZE, PATCH_SIZE, IMAGE_TOKENS = 64, 8, 16


def tiny_gemma3_vlm_checkpoint() -> Path:
    def build(tmp: Path) -> None:
        import torch
        import transformers as tf

        torch.manual_seed(0)
        text = tf.Gemma3TextConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=128,
                                   max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        vision = tf.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                       vision_use_head=False)
        cfg = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                              mm_tokens_per_image=IMAGE_TOKENS, tie_word_embeddings=True)
        model = tf.Gemma3ForConditionalGeneration(cfg)
        with torch.no_grad():  # transformers starts the projection at zero: every image would embed to zeros
            for name, p in model.named_parameters():
                if name.endswith("mm_input_projection_weight"):
                    p.normal_(0.0, 0.02)
        model = model.to(torch.bfloat16)
        out = tmp / VLM_NAME
        model.save_pretrained(out, safe_serialization=True)
        _hub_layout(out / "model.safetensors")
        src = smollm2_checkpoint()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).exists():
                shutil.copy2(src / name, out / name)
        # what Gemma3ImageProcessor saves, for these image sizes (the converter reads mean, std and seq length)
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
            "do_resize": True, "do_rescale": True, "do_normalize": True, "rescale_factor": 1 / 255,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "image_seq_length": IMAGE_TOKENS,
        }, indent=2) + "\n")

    return _build_once(f"{VLM_NAME}-{FIXTURE_VERSION}", build) / VLM_NAME


def _hub_layout(path: Path) -> None:
    """Name the vision tower's tensors as the released Gemma 3 checkpoints on the Hub do
    (``vision_tower.vision_model.*``: what the converter maps), not as this transformers saves them."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


if __name__ == "__main__":  # python -m tests.vlm_models
    print(tiny_gemma3_vlm_checkpoint())
