"""GGUF files in: find and check one, then dequantize it to a plain float32 Hugging Face directory.

The header is read with the `gguf` package (architecture, weight type, tensor table) before
any weights are loaded, so an unsupported architecture or a corrupt or truncated file is
refused in one line. The weights go through transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`, dequantized to float32); a model loaded that way
refuses `save_pretrained`, so its state dict is copied into a plain model of the same class,
which saves normally. The directory written is what `adainfer-export` exports and what
`adainfer bench` compares against.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ExportError, UnsupportedModelError
from ..manifest import ModelSource, sha256_of
from .loading import check_loading_info

GGUF_MAGIC = b"GGUF"
SUFFIX = ".gguf"


@dataclass(frozen=True)
class GGUFHeader:
    """What the exporter needs to know about a GGUF file before loading its weights."""

    architecture: str
    quantization: Optional[str]  # e.g. "Q4_1" (general.file_type), None when the file does not say
    tensors: int


def is_gguf_file(path: Path) -> bool:
    """A regular file named `*.gguf` or starting with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == SUFFIX:
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def find_gguf(path: Path) -> Optional[Path]:
    """The GGUF file `path` names: the file itself, or the one `.gguf` in a directory without
    `config.json`. None for anything else (a Hugging Face directory, a missing path);
    a directory holding several `.gguf` files is refused."""
    path = Path(path)
    if is_gguf_file(path):
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ExportError(f"{path} holds {len(found)} GGUF files ({names}); pass the one to export")
    return found[0] if found else None


def supported_architectures() -> list[str]:
    """GGUF architectures we can export: those transformers' GGUF loader reads and a family adapter covers."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from .families import supported_model_types

    return sorted(set(GGUF_CONFIG_MAPPING) & set(supported_model_types()))


def read_header(path: Path) -> GGUFHeader:
    """Read and check a GGUF file's header and tensor table (no weights are dequantized)."""
    import gguf

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ExportError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic != GGUF_MAGIC:
        raise ExportError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct / numpy errors, ... on a damaged file
        raise ExportError(f"{path}: not a readable GGUF file, truncated or corrupt ({_first_line(exc)})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ExportError(f"{path}: truncated (tensor {tensor.name} ends past the end of the file)")
    architecture = _field(reader, "general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise ExportError(f"{path}: the GGUF header has no general.architecture")
    supported = supported_architectures()
    if architecture not in supported:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {architecture[:40]!r}; "
                                    f"supported: {', '.join(supported)}")
    file_type = _field(reader, "general.file_type")
    return GGUFHeader(architecture=architecture, quantization=_file_type_name(file_type), tensors=len(reader.tensors))


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # a field of the wrong shape: treat as absent, the checks above name it
        return None


def _file_type_name(file_type) -> Optional[str]:
    """general.file_type (a llama.cpp `LlamaFileType`) as the weight type's usual name, e.g. 3 -> "Q4_1"."""
    import gguf

    if not isinstance(file_type, int):
        return None
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {file_type}"


def source_of(path: Path, header: GGUFHeader) -> ModelSource:
    """The manifest's record of the GGUF a bundle came from."""
    path = Path(path)
    return ModelSource(format="gguf", file=path.name, size=path.stat().st_size, sha256=sha256_of(path),
                       quantization=header.quantization)


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path, header: Optional[GGUFHeader] = None, progress: bool = True) -> Path:
    """Dequantize a GGUF file into a plain float32 Hugging Face directory `out_dir` (created):
    `model.safetensors`, `config.json` (no `quantization_config`), `generation_config.json`,
    `tokenizer.json`, `tokenizer_config.json` (with `chat_template`) and `chat_template.jinja`.
    Returns `out_dir`. An unsupported architecture or a damaged file raises `ExportError`
    (`header`: the file's `read_header`, when the caller already checked it; `progress=False`
    silences transformers' dequantization progress bar)."""
    import torch
    import transformers

    gguf_path = Path(gguf_path)
    if header is None:
        read_header(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    kwargs = dict(gguf_file=gguf_path.name)
    try:
        with warnings.catch_warnings(), _quiet_stderr(not progress):
            warnings.simplefilter("ignore")
            loaded, info = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32,
                                                                             output_loading_info=True, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    except Exception as exc:  # transformers raises many types for a file it cannot map
        raise ExportError(f"cannot load {gguf_path} with transformers' GGUF loader: {_first_line(exc)}") from None
    check_loading_info(info, gguf_path)
    config = loaded.config
    config.quantization_config = None
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    plain.save_pretrained(out_dir)
    del plain
    tokenizer.save_pretrained(out_dir)
    _plain_config(out_dir / "config.json")
    _template_in_tokenizer_config(out_dir)
    return out_dir


def _quiet_stderr(quiet: bool):
    """transformers draws its GGUF progress bar on stderr whatever its own settings say."""
    return contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()


def _plain_config(path: Path) -> None:
    """The weights saved are plain float32: no quantization_config (transformers would look for a quantizer)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _template_in_tokenizer_config(out_dir: Path) -> None:
    """Also keep the chat template in tokenizer_config.json (older readers look only there)."""
    template_file = out_dir / "chat_template.jinja"
    config_file = out_dir / "tokenizer_config.json"
    if not template_file.is_file() or not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.setdefault("chat_template", template_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

