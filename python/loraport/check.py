"""Loadability: which of a LoRA's keys a base model's loader would not consume, and which modules
do not fit the base's weights (``loraport check LORA --base BASE``; `pipeline.port` runs it on
its output against the target).

Two ways, and the result says which one was used:
  * "diffusers": when the base is a diffusers folder with a ``config.json`` for its denoiser
    (``transformer/`` or ``unet/``, or the folder itself) and diffusers and peft are installed:
    the model class named in that config is built from it on the meta device (no weights, no
    memory), the LoRA file is converted by the pipeline's own ``lora_state_dict`` (the class in
    ``model_index.json``, else the family's usual pipeline), and loaded with the model's
    ``load_lora_adapter``; the keys diffusers reports as unexpected, and those of modules the
    model does not have, are the unconsumed ones (in the converted, diffusers names). A
    loader that raises is reported with its error (diffusers' Musubi Wan converter, for one,
    expects every module to sit in a block). Modules whose LoRA shapes do not fit the model's
    weights are listed and left out of the load.
  * "loraport key maps": everywhere else (single files, Tencent .pt, original names, no
    diffusers): every module is looked up in the base through archs' key maps, as `port` does;
    a module with no weight there leaves all its keys unconsumed."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field

from . import formats
from .basemodel import BaseModel
from .errors import InputError

# The pipeline whose LoRA loader serves a model class, when the folder has no model_index.json.
_PIPELINES = {
    "WanTransformer3DModel": "WanPipeline",
    "HunyuanVideoTransformer3DModel": "HunyuanVideoPipeline",
    "HunyuanVideoFramepackTransformer3DModel": "HunyuanVideoFramepackPipeline",
    "FluxTransformer2DModel": "FluxPipeline",
    "UNet2DConditionModel": "StableDiffusionXLPipeline",
}
_DENOISERS = ("transformer", "unet")


@dataclass
class CheckReport:
    lora: str
    base: str
    method: str  # "diffusers (<Pipeline>.lora_state_dict + <Model>.load_lora_adapter)" or "loraport key maps"
    keys: int  # tensors in the LoRA file
    unconsumed: list[str] = field(default_factory=list)  # LoRA keys the loader would not consume
    misfits: list[dict] = field(default_factory=list)  # {module, lora, base}: shapes that do not fit
    error: str | None = None  # the loader raised this

    @property
    def ok(self) -> bool:
        return not self.unconsumed and not self.misfits and self.error is None

    def table(self) -> str:
        lines = [f"{self.lora} on {self.base}: checked with {self.method}"]
        if self.error:
            lines.append(f"  the loader failed: {self.error}")
        lines.append(f"  {self.keys - len(self.unconsumed)} of {self.keys} keys consumed, "
                     f"{len(self.misfits)} modules whose shape does not fit")  # fmt: skip
        lines += [f"  unconsumed  {k}" for k in self.unconsumed]
        lines += [f"  misfit      {m['module']}: LoRA {m['lora']} vs base {m['base']}" for m in self.misfits]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def _config_folder(base) -> str | None:
    """The folder holding the denoiser's config.json in a diffusers layout (one naming a
    diffusers model class: not a transformers LLM's), or None."""
    if not isinstance(base, (str, os.PathLike)) or not os.path.isdir(base):
        return None
    for sub in (*_DENOISERS, ""):
        path = os.path.join(os.fspath(base), sub, "config.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    name = json.load(f).get("_class_name")
            except (OSError, ValueError, AttributeError):
                return None
            return os.path.dirname(path) if name else None
    return None


def check(lora, base, *, arch: str = "auto", use_diffusers: bool = True) -> CheckReport:
    """Check LoRA ``lora`` (path or state dict) against base ``base`` (see the module docstring)."""
    tensors, label = _tensors(lora)
    folder = _config_folder(base) if use_diffusers else None
    if folder is not None:
        try:
            import diffusers  # noqa: F401
            import peft  # noqa: F401
        except ImportError:
            folder = None
    if folder is not None:
        with open(os.path.join(folder, "config.json")) as f:
            if not hasattr(diffusers, json.load(f)["_class_name"]):
                folder = None
    base_label = base if isinstance(base, (str, os.PathLike)) else "<state dict>"
    if folder is not None:
        return _check_diffusers(tensors, label, os.fspath(base), folder)
    return _check_key_maps(lora, tensors, label, base, str(base_label), arch)


def _tensors(lora) -> tuple[dict, str]:
    if isinstance(lora, dict):
        return dict(lora), "<state dict>"
    from safetensors import safe_open

    path = os.fspath(lora)
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}, path
    except Exception as e:
        raise InputError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _shape(t) -> list[int]:
    return list(t.shape) if hasattr(t, "shape") else list(t)


def _check_key_maps(lora, tensors, label, base, base_label, arch) -> CheckReport:
    from .plans import locate  # the lookup `port` does

    b = BaseModel(base)
    lf = formats.read_lora(lora, arch=arch, base_names=b.module_names())
    style = lf.arch.base_style(b.module_names())
    rep = CheckReport(label, base_label, "loraport key maps", len(tensors))
    for m in lf.modules:
        keys = sorted(k for k in tensors if k.startswith(m.key + "."))
        pieces, shape = (None, None) if not m.known or style is None else locate(lf.arch, m, lf.style, b, style)
        if pieces is None:
            rep.unconsumed += keys
            continue
        if not m.fits(shape):  # LoRA factors and every adapter type know the weight shape they adapt
            rep.misfits.append({"module": m.name, "lora": list(m.shape), "base": list(shape)})
    rep.unconsumed.sort()
    return rep


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


_UNEXPECTED = re.compile(r"unexpected keys found in the model: (.*?)\.?\s*$", re.S)


def _check_diffusers(tensors, label, base, folder) -> CheckReport:
    import diffusers
    import torch

    with open(os.path.join(folder, "config.json")) as f:
        model_class = getattr(diffusers, json.load(f)["_class_name"])
    pipeline_name = None
    index = os.path.join(base, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            pipeline_name = json.load(f).get("_class_name")
    pipeline_name = pipeline_name or _PIPELINES.get(model_class.__name__)
    pipeline = getattr(diffusers, pipeline_name or "", None)
    prefix = "unet" if model_class.__name__.startswith("UNet") else "transformer"
    loaders = f"{pipeline_name}.lora_state_dict + {model_class.__name__}.load_lora_adapter"
    method = f"diffusers {diffusers.__version__} ({loaders})"
    rep = CheckReport(label, base, method, len(tensors))
    try:
        with torch.device("meta"):
            model = model_class.from_config(model_class.load_config(folder))
    except Exception as e:  # a config this diffusers cannot build: said, and nothing loaded
        rep.error = f"building {model_class.__name__} from {folder}/config.json raised {type(e).__name__}: {e}"
        rep.unconsumed = sorted(tensors)
        return rep
    if isinstance(next(iter(tensors.values())), (list, tuple)):  # shapes only: the loader needs tensors
        from safetensors.torch import load_file

        tensors = load_file(label)
    try:
        state = pipeline.lora_state_dict(dict(tensors)) if pipeline is not None else dict(tensors)
    except Exception as e:  # the library's own converter failing on this file is a finding, reported
        rep.error = f"{pipeline_name}.lora_state_dict raised {type(e).__name__}: {e}"
        rep.unconsumed = sorted(tensors)
        return rep
    if isinstance(state, tuple):  # (state dict, network alphas) for the UNet pipelines
        state = state[0]
    params = dict(model.named_parameters())
    lead = prefix + "."
    own = {k: v for k, v in state.items() if k.startswith(lead)}
    rep.unconsumed += sorted(k for k in state if not k.startswith(lead))
    for key in [k for k in own if k.endswith(".lora_A.weight")]:
        module = key[len(lead) : -len(".lora_A.weight")]
        weight = params.get(module + ".weight")
        up = own.get(f"{lead}{module}.lora_B.weight")
        mine = [k for k in own if k.startswith(f"{lead}{module}.")]
        if weight is None:  # no such layer: nothing can consume its keys (PEFT would raise on a file of only those)
            rep.unconsumed += sorted(mine)
        elif up is not None and [up.shape[0], *own[key].shape[1:]] != list(weight.shape):
            lora_shape = [up.shape[0], *own[key].shape[1:]]
            rep.misfits.append({"module": module, "lora": lora_shape, "base": list(weight.shape)})
        else:
            continue
        for k in mine:
            del own[k]
    log, collect = logging.getLogger("diffusers"), _Collect()
    log.addHandler(collect)
    try:
        if own:
            model.load_lora_adapter(own, prefix=prefix, adapter_name="loraport_check", low_cpu_mem_usage=True)
    except Exception as e:
        rep.error = f"{model_class.__name__}.load_lora_adapter raised {type(e).__name__}: {e}"
        rep.unconsumed += sorted(own)
        return rep
    finally:
        log.removeHandler(collect)
    for message in collect.messages:
        m = _UNEXPECTED.search(message)
        if m:
            rep.unconsumed += [lead + k.strip() for k in m.group(1).split(",") if k.strip()]
    rep.unconsumed.sort()
    return rep
