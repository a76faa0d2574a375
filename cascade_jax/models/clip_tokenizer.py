"""Former home of the CLIP tokenizer; it now lives in :mod:`cascade_jax.data.clip_tokenizer`.

Kept so that ``from cascade_jax.models.clip_tokenizer import CLIPTokenizer`` keeps working.
"""

from cascade_jax.data.clip_tokenizer import (AddedToken, CLIPTokenizer, bytes_to_unicode, clean_text,  # noqa: F401
                                             openai_bpe_path, read_merges, write_tokenizer_folder_from_openai_bpe)
