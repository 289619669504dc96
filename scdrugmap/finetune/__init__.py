"""LoRA fine-tuning of backbones, run only when asked (``scdrugmap finetune``; needs ``[lora]``)."""
