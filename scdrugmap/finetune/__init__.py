"""LoRA fine-tuning of backbones, run only when asked (``scdrugmap finetune``; needs ``[lora]``).

:func:`run_finetune` trains LoRA adapters and a classification head per fold of the probes' own
splits and stores the scores beside the frozen probes (``method = 'lora'``); see :mod:`.run`.
torch and peft are imported when a run starts, never at import.
"""

from .run import run_finetune

__all__ = ["run_finetune"]
