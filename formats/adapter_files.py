"""Adapter directories in PEFT's format: save_adapter, load_adapter, apply_saved_adapter.

A directory holds what `peft.PeftModel.save_pretrained` writes (PEFT 0.21.2), so each side loads
the other's:

    adapter_config.json        {"peft_type": "LORA" or "VERA", "r": 8, "target_modules": [...], ...}
    adapter_model.safetensors  "base_model.model.<layer>.lora_A.weight" (r, in), ...

LoRA: fields `lora_alpha`, `use_rslora`, `use_dora`, `lora_dropout`; tensors `lora_A.weight` (r,
in), `lora_B.weight` (out, r), for DoRA also `lora_magnitude_vector` (out,). VeRA: fields
`projection_prng_key`, `save_projection`, `d_initial`, `vera_dropout`; tensors `vera_lambda_d`
(r,), `vera_lambda_b` (out,), and with save_projection the shared `base_model.vera_A` (r, max_in)
and `base_model.vera_B` (max_out, r) (we write save_projection = false: the seed regenerates them).
What PEFT does not know goes in the safetensors `__metadata__`, which PEFT ignores: METADATA_KEYS.

Writing: the safetensors file first, the config last, each atomically (safetensors_io). A save
interrupted between the two leaves new tensors beside the old config, which `config_sha256`
detects on reading (as it does a config edited by hand). Files from PEFT have no such entry.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re

import torch
import torch.nn as nn

import dora
import lora
import vera
from adapters import ALL_LINEAR, AdapterLinear, adapter_layers, is_linear_like, replace_submodule
from checks import check_bool, check_int, check_number, check_probability
from formats import safe_open, safetensors_io
from formats.target_patterns import check_target_pattern

CONFIG_FILE = "adapter_config.json"
TENSOR_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's prefix before a layer's qualified name
FORMAT_VERSION = "1"  # of the entries this project adds to __metadata__
METADATA_KEYS = {  # what save_adapter writes there, beside safetensors_io's content_sha256
    "format": '"pt", as PEFT and transformers write it',
    "adapter_format_version": "FORMAT_VERSION",
    "config_sha256": "SHA-256 of adapter_config.json's bytes, written by the same save",
    "base_fingerprint": "SHA-256 of the base model's state (base_fingerprint)",
    "base_layer_type": "class of the adapted layers' bases: Linear, NF4Linear, ...",
    "vera_projection_sha256": "VeRA: vera.projection_checksum of the drawn vera_A, vera_B",
}
# Each method's tensors: PEFT's key suffix -> this project's parameter name.
TENSOR_NAMES = {
    "lora": {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"},
    "dora": {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B",
             "lora_magnitude_vector": "magnitude"},
    "vera": {"vera_lambda_d": "lambda_d", "vera_lambda_b": "lambda_b"},
}
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")  # VeRA with save_projection
# PEFT's defaults (LoraConfig, VeraConfig) for fields a config leaves out, and each field's check.
PEFT_DEFAULTS = {
    "LORA": {"r": 8, "lora_alpha": 8, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0},
    "VERA": {"r": 256, "projection_prng_key": 0, "save_projection": True, "d_initial": 0.1,
             "vera_dropout": 0.0},
}
FIELD_CHECKS = {
    "r": lambda value, name: check_int(value, name, low=1),
    "lora_alpha": lambda value, name: check_number(value, name, low=0, low_open=True),
    "use_rslora": check_bool, "use_dora": check_bool, "save_projection": check_bool,
    "lora_dropout": check_probability, "vera_dropout": check_probability,
    "projection_prng_key": lambda value, name: check_int(value, name, 0, 2**64 - 1),
    "d_initial": check_number,
}
# PEFT options this code does not implement: refused unless empty (None, False, [] or {}).
UNSUPPORTED_OPTIONS = ("fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
                       "layers_to_transform", "layers_pattern", "exclude_modules", "lora_bias",
                       "use_qalora", "layer_replication", "target_parameters",
                       "trainable_token_indices", "alora_invocation_tokens", "use_bdlora")


def matches_targets(name: str, target_modules) -> bool:
    """PEFT's rule: a list holds names or suffixes ("q_proj" matches "blocks.0.attn.q_proj"); a
    string is a regular expression the whole name must match; "all-linear": the tensors decide."""
    if target_modules == ALL_LINEAR:
        return True
    if isinstance(target_modules, str):
        return _target_pattern(target_modules).fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


@functools.lru_cache(maxsize=64)
def _target_pattern(pattern: str) -> re.Pattern:
    """A target_modules pattern, checked once for bounded matching time (check_target_pattern)."""
    return re.compile(check_target_pattern(pattern, "target_modules"))


def loadable_adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """The model's adapter layers, refused if there are none or any is merged."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapter layers to load into (apply_saved_adapter builds "
                         "them)")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("unmerge the adapters before loading new ones (a merged base would keep "
                         "the old update)")
    return layers


@dataclasses.dataclass
class SavedAdapter:
    """An adapter directory's contents in memory: what save_adapter writes, read_adapter reads."""
    config: dict  # adapter_config.json, with PEFT's defaults filled in
    tensors: dict  # PEFT key -> tensor
    metadata: dict  # safetensors __metadata__, without content_sha256 and config_sha256
    source: str = "the model"  # where it came from, for messages

    @property
    def method(self) -> str:
        """"lora", "dora" or "vera" (rsLoRA is LoRA with use_rslora)."""
        config = self.config
        return "vera" if config["peft_type"] == "VERA" else "dora" if config["use_dora"] else "lora"

    def layers(self) -> dict[str, dict[str, torch.Tensor]]:
        """{layer name: {parameter name: tensor}}, in key order, without VeRA's shared pair."""
        names, layers = TENSOR_NAMES[self.method], {}
        for key, tensor in ((k, t) for k, t in self.tensors.items() if k not in PROJECTION_KEYS):
            suffixes = "|".join(map(re.escape, names))
            match = re.fullmatch(rf"{re.escape(KEY_PREFIX)}(.+)\.({suffixes})", key)
            if match is None:
                raise ValueError(f"{self.source}: tensor {key!r} is not a {self.method} key "
                                 f"(base_model.model.<layer>.{{{', '.join(names)}}})")
            layers.setdefault(match[1], {})[names[match[2]]] = tensor
        return layers


# --------------------------------------------------------------------------------------------------
# Files: write, read, check.
def write_adapter(saved: SavedAdapter, directory: str) -> None:
    """Write `saved` into `directory` (created if needed): tensors first, config last."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    safetensors_io.remove_stale_temporaries(directory)  # left by an interrupted save here
    text = (json.dumps(saved.config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    metadata = dict(saved.metadata, config_sha256=safetensors_io.sha256_hex(text))
    safetensors_io.save_file(saved.tensors, os.path.join(directory, TENSOR_FILE), metadata)
    safetensors_io.atomic_write(os.path.join(directory, CONFIG_FILE), lambda f: f.write(text))


def read_adapter(directory: str) -> SavedAdapter:
    """Read and check an adapter directory, ours or PEFT's. Every problem is a one-line ValueError
    naming the file; a missing directory or file is a FileNotFoundError."""
    directory = os.fspath(directory)
    config_path, tensor_path = (os.path.join(directory, f) for f in (CONFIG_FILE, TENSOR_FILE))
    for path in (config_path, tensor_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file; an adapter directory holds "
                                    f"{CONFIG_FILE} and {TENSOR_FILE} (save_adapter writes one)")
    # Only regular files, the config no bigger than a JSON file of ours may be (safe_open).
    text = safe_open.read_regular(config_path, safe_open.MAX_JSON_BYTES)
    try:
        config = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({type(error).__name__})") from None
    tensors, metadata = safetensors_io.load_file(tensor_path)
    stored = metadata.pop("config_sha256", None)
    if stored is not None and stored != safetensors_io.sha256_hex(text):
        raise ValueError(f"{config_path} is not the config saved with {TENSOR_FILE} (config_sha256 "
                         "differs): a save was interrupted or the config edited; save again")
    version = metadata.get("adapter_format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"{tensor_path}: adapter_format_version is {version!r}, this code reads "
                         f"{FORMAT_VERSION!r}")
    saved = SavedAdapter(check_config(config, config_path), tensors, metadata, directory)
    check_tensors(saved)
    return saved


def check_config(config, source: str) -> dict:
    """The config with PEFT's defaults filled in; a ValueError/TypeError naming a bad field."""
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if not isinstance(peft_type, str) or peft_type not in PEFT_DEFAULTS:
        raise ValueError(f"{source}: must be a JSON object whose peft_type is 'LORA' or 'VERA'")
    config = {**PEFT_DEFAULTS[config["peft_type"]], **config}
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise ValueError(f"{source}: {option} = {config[option]!r} is not supported here")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{source}: bias = {config['bias']!r} is not supported (only 'none')")
    for field in PEFT_DEFAULTS[config["peft_type"]]:
        FIELD_CHECKS[field](config[field], f"{source}: {field}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and targets or isinstance(targets, list) and targets
            and all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"{source}: target_modules must be a non-empty list of names, a regular "
                         f"expression or 'all-linear', got {targets!r}")
    if isinstance(targets, str) and targets != ALL_LINEAR:  # untrusted: bounded matching time
        check_target_pattern(targets, f"{source}: target_modules")
    return config


def check_tensors(saved: SavedAdapter) -> None:
    """Each layer has exactly its method's tensors, finite floats, and is in target_modules."""
    expected, layers = set(TENSOR_NAMES[saved.method].values()), saved.layers()
    if not layers:
        raise ValueError(f"{saved.source}: holds no adapter tensors")
    for layer, tensors in layers.items():
        if set(tensors) != expected:
            raise ValueError(f"{saved.source}: layer {layer!r} has tensors {sorted(tensors)}, "
                             f"{saved.method} needs {sorted(expected)}")
        if not matches_targets(layer, saved.config["target_modules"]):
            raise ValueError(f"{saved.source}: layer {layer!r} has tensors but is not in "
                             f"target_modules {saved.config['target_modules']!r}")
    for key, tensor in saved.tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{saved.source}: tensor {key!r} must hold finite floats "
                             f"({tensor.dtype}, NaN or Inf found or not floating point)")


def check_same_adapter(saved: SavedAdapter, model: SavedAdapter) -> None:
    """ValueError naming the first field where a file and the model's own adapters differ."""
    def differ(field, in_file, in_model):
        raise ValueError(f"{saved.source}: {field} is {in_file!r} in the file but {in_model!r} "
                         f"in the model")
    if saved.method != model.method:
        differ("method", saved.method, model.method)
    for field in ("r", "projection_prng_key") if saved.method == "vera" else \
            ("r", "lora_alpha", "use_rslora"):
        if saved.config[field] != model.config[field]:
            differ(field, saved.config[field], model.config[field])
    for key in ("vera_projection_sha256", "base_layer_type", "base_fingerprint"):
        if key in saved.metadata and saved.metadata[key] != model.metadata.get(key):
            differ(key, saved.metadata[key], model.metadata.get(key))
    file_layers, model_layers = set(saved.layers()), set(model.layers())
    if file_layers != model_layers:
        differ("targets", f"{len(file_layers)} layers, {sorted(file_layers - model_layers)[:3]} "
               "not in the model", f"{len(model_layers)} layers, "
               f"{sorted(model_layers - file_layers)[:3]} not in the file")
    for key, tensor in saved.tensors.items():
        ours = model.tensors[key]
        if tensor.shape != ours.shape:
            differ(f"the shape of {key}", tuple(tensor.shape), tuple(ours.shape))
        if key in PROJECTION_KEYS and not torch.equal(tensor.to(ours), ours):
            differ(key, "the saved matrix", "another one (another seed or random generator)")


# --------------------------------------------------------------------------------------------------
# Models: describe, save, load, build.
def _base_key(key: str, layers: dict) -> str | None:
    """The plain model's name for a state-dict key; None for an adapter's own tensors and flags."""
    parts = key.split(".")
    for i in range(len(parts)):
        if ".".join(parts[:i]) in layers:  # parts[:i] is an adapter layer (adapters do not nest)
            return ".".join(parts[:i] + parts[i + 1:]) if parts[i] == "base" else None
    return key


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of the state outside the adapters, named as
    in the plain model: a model and its adapted self have the same fingerprint."""
    layers, digest = adapter_layers(model), hashlib.sha256()
    named = ((_base_key(key, layers), tensor) for key, tensor in model.state_dict().items())
    for key, tensor in sorted((k, t) for k, t in named if k is not None):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # (bytes,)
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _one_setting(per_layer: dict[str, dict]) -> dict:
    """The fields every layer agrees on; a ValueError naming a field where two layers differ."""
    seen = {}  # field -> (value, the first layer with it)
    for name, fields in per_layer.items():
        for field, value in fields.items():
            if seen.setdefault(field, (value, name))[0] != value:
                first_value, first = seen[field]
                raise ValueError(f"one adapter file holds one setting per field: {field} is "
                                 f"{first_value!r} in {first!r} but {value!r} in {name!r}")
    return {field: value for field, (value, _) in seen.items()}


def saved_adapter(model: nn.Module, projection: bool = False,
                  fingerprint: bool = True) -> SavedAdapter:
    """What save_adapter writes for `model`, in memory (the tensors are the live parameters).
    `projection`: VeRA's shared pair too (PEFT's save_projection); `fingerprint`: of the base."""
    if not (layers := adapter_layers(model)):
        raise ValueError("model has no adapter layers to save")
    config = _one_setting({n: layer.adapter_config() for n, layer in layers.items()})
    config.update(target_modules=list(layers), bias="none", fan_in_fan_out=False, task_type=None,
                  base_model_name_or_path=None, inference_mode=True)
    metadata = _one_setting({n: dict(layer.adapter_metadata(), base_layer_type=type(
        layer.base).__name__) for n, layer in layers.items()})
    metadata.update(format="pt", adapter_format_version=FORMAT_VERSION)
    if fingerprint:
        metadata["base_fingerprint"] = base_fingerprint(model)
    saved = SavedAdapter(config, {}, metadata)
    saved.tensors.update({f"{KEY_PREFIX}{n}.{suffix}": getattr(layer, name).detach()
                          for n, layer in layers.items()
                          for suffix, name in TENSOR_NAMES[saved.method].items()})
    if projection and saved.method == "vera":
        shared = next(iter(layers.values())).vera_projection
        saved.tensors.update(zip(PROJECTION_KEYS, (shared.vera_A, shared.vera_B)))
    return saved


def save_adapter(model: nn.Module, directory: str) -> None:
    """Write the model's adapters as a directory that PEFT loads (format: module docstring)."""
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise ValueError("unmerge the adapters before saving: a merged base is not the base they "
                         "were trained on (its fingerprint goes in the file)")
    write_adapter(saved_adapter(model), directory)


def checked_source(source) -> SavedAdapter:
    """read_adapter(source) for a directory; a SavedAdapter's config and tensors checked again."""
    if isinstance(source, SavedAdapter):
        saved = dataclasses.replace(source, config=check_config(source.config, source.source))
        check_tensors(saved)
        return saved
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be an adapter directory or a SavedAdapter, got "
                        f"{type(source).__name__} (a tensor dict has no r, alpha, seed to check)")
    return read_adapter(source)


@torch.no_grad()
def load_adapter(model: nn.Module, source, *, check_base: bool = True) -> None:
    """Copy an adapter directory (or read_adapter's SavedAdapter) into the adapters `model` carries.

    Refuses, naming the field and both values, a file whose method, r, alpha, rsLoRA, targets,
    VeRA seed or matrices, base layer type or shapes differ from the model's, and with `check_base`
    a base other than the one it was saved on (a switching loop that checked it once may skip it).
    Nothing is copied unless all fits. An in-memory SavedAdapter is checked again (it may have been
    edited since it was read); a bare tensor dict is refused: it cannot say how it was trained.
    """
    saved = checked_source(source)
    layers = loadable_adapter_layers(model)
    check_base = check_base and "base_fingerprint" in saved.metadata
    if not check_base:
        saved = dataclasses.replace(saved, metadata={k: v for k, v in saved.metadata.items()
                                                     if k != "base_fingerprint"})
    projection = any(key in saved.tensors for key in PROJECTION_KEYS)
    check_same_adapter(saved, saved_adapter(model, projection, fingerprint=check_base))
    for name, tensors in saved.layers().items():
        for parameter, tensor in tensors.items():
            getattr(layers[name], parameter).copy_(tensor)


def apply_saved_adapter(model: nn.Module, source) -> nn.Module:
    """Build on a plain base model the adapters a directory describes, load them; returns model.
    The layers are those the file has tensors for; a failure leaves the model as it was."""
    saved = checked_source(source)
    if adapter_layers(model):
        raise ValueError("model already carries adapters: load_adapter replaces their tensors")
    config, names = saved.config, list(saved.layers())
    for name, module in model.named_modules():  # a PEFT config may name more than it saved
        if is_linear_like(module) and name not in names and config["target_modules"] != ALL_LINEAR \
                and matches_targets(name, config["target_modules"]):
            raise ValueError(f"{saved.source}: target_modules names {name!r} but the file holds "
                             "no tensors for it")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if saved.method == "vera":
            vera.apply_vera(model, names, r=config["r"], seed=config["projection_prng_key"],
                            d_initial=config["d_initial"], dropout=config["vera_dropout"])
        else:
            apply = dora.apply_dora if saved.method == "dora" else lora.apply_lora
            apply(model, names, r=config["r"], alpha=float(config["lora_alpha"]),
                  dropout=config["lora_dropout"], rslora=config["use_rslora"])
        load_adapter(model, saved)
    except BaseException:
        for name, layer in adapter_layers(model).items():
            replace_submodule(model, name, layer.base)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        raise
    return model
