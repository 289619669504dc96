"""Zero-shot drug-response calls by a chat model (scDrugMap's GPT-4o-mini evaluation), as a command.

Any OpenAI-compatible chat-completions endpoint works; the ``openai`` package is needed only
when a request is actually sent (``pip install 'scdrugmap[zeroshot]'``).
"""

from .run import run_zero_shot

__all__ = ["run_zero_shot"]
