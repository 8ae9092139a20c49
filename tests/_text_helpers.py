"""A byte-level tokenizer for the tiny test models (vocab 128): text tests without a tokenizer file."""


class ByteTokenizer:
    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (b % 125) for b in text.encode("utf-8")]}
