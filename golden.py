"""The golden packs of testdata/golden/ (laid out by the original BAGEL code) as batches, and the tiny
random BAGEL they fit: the fixtures the tests and bench.py's GPU check share.

A golden pack keeps the original packer's layout lists exactly; its pixels, latents and noise are
random (seeded), so any model with the golden tokenizer's vocabulary and 8x8 latent grids runs it.
"""
import json
import os

import torch

from model import AEConfig, Bagel, BagelConfig, LLMConfig, ViTConfig

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "golden")
CASES = sorted(f[:-5] for f in os.listdir(GOLDEN) if f.endswith(".json"))

# 4 levels (downsample 8, like FLUX); up.1-3 have equal shapes, so a wrong up-block order fails on values
TINY_AE = AEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16)
# grids of 8 as in the golden packing cases; ViT image_size 112 = 8 patches of 14
TINY = BagelConfig(llm=LLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=300),
                   vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=112),
                   vae=TINY_AE, max_latent_size=8, vit_max_num_patch_per_side=8)


def tiny_bagel(seed: int = 0, config: BagelConfig = TINY) -> Bagel:
    """Random tiny BAGEL; every weight random (norms near 1), so und and _moe_gen weights all differ."""
    torch.manual_seed(seed)
    model = Bagel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return model


def golden_batch(case: str, seed: int = 0) -> dict:
    """The packed batch of a golden case (layout from the original BAGEL code), with random pixels,
    latents and noise; the layout lists are the original packer's."""
    with open(os.path.join(GOLDEN, case + ".json")) as f:
        e = json.load(f)["expected"]
    g = torch.Generator().manual_seed(seed)
    b = {k: e[k] for k in ("sequence_length", "sample_lens", "split_lens", "attn_modes", "patchified_vae_latent_shapes")}
    for k in ("packed_text_ids", "packed_text_indexes", "packed_position_ids", "packed_vit_token_indexes",
              "packed_vit_position_ids", "vit_token_seqlens", "packed_latent_position_ids",
              "packed_vae_token_indexes", "mse_loss_indexes", "packed_label_ids", "ce_loss_indexes"):
        b[k] = torch.tensor(e[k], dtype=torch.long)
    b["packed_timesteps"] = torch.tensor([float(t) for t in e["packed_timesteps"]])
    b["packed_vit_tokens"] = torch.rand(len(e["packed_vit_token_indexes"]), 588, generator=g) * 2 - 1
    if e["patchified_vae_latent_shapes"]:
        n, _, hh, ww = e["padded_images_shape"]
        b["padded_latent"] = torch.randn(n, 16, hh // 8, ww // 8, generator=g)
    b["packed_noise"] = torch.randn(len(e["packed_vae_token_indexes"]), 64, generator=g)
    return b
