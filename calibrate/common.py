"""What the three calibrations share: loading a model from a name, path or config, run metadata, argument parsing,
and the refusal to overwrite a finished file without `--force`.

A model is given as a packaged name (`executor.models.known_models()`, real weights), a local HF directory or GGUF
file (real weights), a `config.json` (random weights: latency does not depend on weight values) or a shape the
simulator knows (`sim.models.MODELS`, e.g. `Llama-2-7B`, random weights).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from executor.models import known_models, load_model, resolve_dtype
from executor.runtime import check_device as check_device  # the calibrations' device check, with their setup
from sim.formats import check_output, cpu_model
from sim.models import MODELS

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    name: str
    random_weights: bool
    total_layers: int  # layers of the real model; `model` may hold fewer (a model too large for the device)


def parse_int_list(text: str, flag: str, minimum: int = 0) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): sorted, unique, each >= minimum."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or values[0] < minimum:
        raise ValueError(f"{flag} must list integers >= {minimum}, got {text!r}")
    return tuple(values)


def check_counts(*given: tuple[str, int]) -> None:
    """Refuse a count flag below 1: each of `given` is (flag, value)."""
    for flag, value in given:
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")


def check_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"{flag} must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return resolve_dtype(DTYPE_NAMES[name])


def check_output_file(path: Path, force: bool, flag: str = "--out") -> None:
    """An output file may be written: not a folder, its folder can be made, and not an existing file unless
    `--force`."""
    check_output(flag, path, force=force)


def check_output_folder(path: Path) -> None:
    check_output("--out", path, folder=True)


def model_config(spec: str):
    """The HF config of a model spec without loading weights (see module docstring); None for a real checkpoint."""
    path = Path(spec).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"--model: config file {path} does not exist")
        return _config_from_json(path)
    if spec in MODELS and spec not in known_models() and not path.exists():
        return _config_from_shape(spec)
    return None


def config_of(spec: str):
    """The HF config of any model spec without loading weights: a config file's or shape's (`model_config`), else the
    checkpoint's own (a packaged model prepared, as loading it would)."""
    config = model_config(spec)
    if config is None:
        from transformers import AutoConfig

        from executor.models import prepare_model

        config = AutoConfig.from_pretrained(prepare_model(spec).hf_dir)
    return config


def model_layers(spec: str) -> int | None:
    """The decoder layers of `--model` read from its config alone (no weights loaded), to check a flag before the
    load; None where the config cannot be read so (the load then says why)."""
    try:
        config = config_of(spec)
    except (OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    layers = getattr(config, "num_hidden_layers", None)
    return layers if isinstance(layers, int) else None


def _config_from_json(path: Path):
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{path}: field 'model_type' is missing (expected a Hugging Face config.json)")
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ValueError(f"{path}: field 'model_type': {err}") from None


def _config_from_shape(name: str):
    from transformers import LlamaConfig

    shape = MODELS[name]
    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=16384,
    )


def load(spec: str, dtype: torch.dtype, device: torch.device, max_layers: int | None = None) -> LoadedModel:
    """Real weights for a name or path; random weights for a config (keeping at most `max_layers` layers)."""
    config = model_config(spec)
    if config is None:
        if max_layers is not None:
            raise ValueError("--layers applies to a model given by its config (CONFIG.json or a shape name)")
        model = load_model(spec, dtype=dtype, device=device)
        return LoadedModel(model, spec, False, model.config.num_hidden_layers)
    return random_model(config, spec, dtype, device, max_layers)


def random_model(config, name: str, dtype: torch.dtype, device: torch.device, max_layers: int | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    total = config.num_hidden_layers
    if max_layers is not None and max_layers < total:
        config.num_hidden_layers = max_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:max_layers]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return LoadedModel(model.eval(), name, True, total)


def estimated_weight_bytes(config, dtype: torch.dtype) -> int:
    """Parameters of a Llama-layout model from its config, times the element size."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    q = config.num_attention_heads * head_dim
    layer = hidden * (2 * q + 2 * kv) + 3 * hidden * config.intermediate_size
    embed = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return (layers * layer + embed) * torch.finfo(dtype).bits // 8


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def versions() -> dict[str, str]:
    import transformers

    return {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "cuda_version": str(torch.version.cuda),
        "python_version": platform.python_version(),
    }


def machine_busy_s() -> float | None:
    """CPU seconds every core of the machine has been busy (a VM's stolen time included: another guest's work) since
    boot, from /proc/stat; None where there is none."""
    try:
        first = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu" or len(first) < 8:
        return None
    ticks = [int(value) for value in first[1:9]]  # user nice system idle iowait irq softirq [steal]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds this process and its reaped children (a distributed run's stage processes) have used."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


OTHER_WORK_NOTE_CORES = 0.25  # other work this busy during a measurement is named


class OtherWork:
    """Over a `with` block: how many cores' worth of CPU everything but this process and the children it reaped used
    (`cores`; None where the machine's busy time cannot be read): what a run on a shared box shares its cores with.
    The run's processes that another process reaps (PPSD's distributed stages, forked by a fork server) are added to
    `elsewhere_s` inside the block, from their own account (`PPSDStats.process_cpu_s`)."""

    def __init__(self) -> None:
        self.cores: float | None = None
        self.elsewhere_s = 0.0

    def __enter__(self) -> OtherWork:
        self._start = (time.perf_counter(), machine_busy_s(), own_cpu_s())
        return self

    def __exit__(self, *_: object) -> None:
        begin, busy, own = self._start
        now, wall = machine_busy_s(), time.perf_counter() - begin
        if busy is None or now is None or wall <= 0:
            return
        self.cores = max(0.0, (now - busy) - (own_cpu_s() - own) - self.elsewhere_s) / wall


def base_metadata(model: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "model": model,
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "host": platform.node(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the host skews CPU timings
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **versions(),
    }


def config_summary(config) -> dict[str, Any]:
    """The JSON-serialisable parts of an HF config that decide the shapes; `max_position_embeddings` is the context
    the decoders run (LongRoPE's original context where it switches factors before the config's: `context_of`)."""
    from executor.adapter import context_of

    keys = (
        "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
        "sliding_window",
    )  # fmt: skip
    summary = {k: getattr(config, k) for k in keys if isinstance(getattr(config, k, None), (int, str, bool, list))}
    if isinstance(getattr(config, "max_position_embeddings", None), int):
        summary["max_position_embeddings"] = context_of(config)[0]
    return summary


def slug(text: str) -> str:
    """A file-name-safe lower-case label: 'Llama-2-7B' -> 'llama-2-7b', '/a/b/config.json' -> 'config'."""
    stem = Path(text).stem if ("/" in text or text.endswith(".json")) else text
    return re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-") or "model"


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear-interpolated percentile of already sorted values."""
    position = fraction * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def check_json_out(out: Path | None, force: bool) -> None:
    """An optional `--out` JSON file may be written (a .json name; not an existing file unless `--force`)."""
    if out is not None and out.suffix != ".json":
        raise ValueError(f"--out {out}: expected a .json file")
    if out is not None:
        check_output("--out", out, force=force)


def model_and_head(args: Any) -> tuple[torch.device, torch.dtype, Any, Any, int]:
    """`--device`, `--dtype` (bf16 on a GPU, fp32 on a CPU by default), the model as one adapter, and the exit head
    and layer `generate` would settle on for `--head` / `--exit-layer`."""
    from executor.adapter import ModelAdapter
    from executor.api import exit_and_head

    device = check_device(args.device)
    dtype = check_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    model = ModelAdapter(load_model(args.model, dtype=dtype, device=device))
    head, exit_layer = exit_and_head(model, args.head, args.exit_layer)
    return device, dtype, model, head, exit_layer
