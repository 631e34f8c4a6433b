"""Generation from a unified checkpoint (KV-cached incremental decoding): text, caption, asr, t2i, tts."""

from ernie5.generation.stream import Stream, sample_bits, sample_categorical
from ernie5.generation.tasks import (Vocab, asr_prompt, caption_prompt, continue_text, generate_image,
                                     generate_speech, text_prompt)

__all__ = ["Stream", "Vocab", "asr_prompt", "caption_prompt", "continue_text", "generate_image", "generate_speech",
           "sample_bits", "sample_categorical", "text_prompt"]
