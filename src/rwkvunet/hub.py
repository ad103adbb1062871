"""Hugging Face Hub names used by the project (one place to change the organisation)."""
HUB_ORG = "rwkv-unet"
KERNEL_REPO_ID = f"{HUB_ORG}/bi-wkv"
KERNEL_VERSION = 1


def encoder_repo_id(variant: str) -> str:
    """Hub repo of an ImageNet-pretrained encoder, e.g. ``rwkv-unet/rwkvunet_enc_b.in1k``."""
    return f"{HUB_ORG}/rwkvunet_enc_{variant}.in1k"
