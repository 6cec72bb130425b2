"""Loading models for the pipelines: checkpoint options, device, precision, prompt tokens.

A checkpoint is a state dict in a ``.pt`` or a ``.safetensors`` file (``checkpoint_io`` reads
both). The options that build a U-Net (the dict of ``model_and_diffusion_defaults()``) come
from, in this order:

1. the ``options`` argument;
2. ``CHECKPOINT_OPTIONS[name]`` for a named checkpoint (the four official U-Nets, and any
   name added with :func:`register_checkpoint_options`, e.g. by the demo module);
3. the sidecar JSON file ``<checkpoint file>.json`` next to a local checkpoint file (or next to
   the file a registered local name resolves to), holding the options dict: ``base.pt.json``,
   ``base.safetensors.json``. Training writes it with :func:`save_options`.

A noised CLIP's YAML config sits beside its image encoder the same way
(``<image encoder file>.yaml``). :func:`convert_checkpoint` rewrites a checkpoint in the
other format and carries these sidecars along.

Precision: ``float32``, ``float16`` (``model.convert_to_fp16()``: the torso convolutions and
the text linears in half precision, the float32 islands of the official models kept) or
``bfloat16`` (the same parameters in bfloat16). The default is float16 on CUDA and float32
elsewhere.
"""

import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from ..checkpoint_io import CHECKPOINT_SUFFIXES, read_state_dict, temporary_path, write_state_dict
from ..clip.model_creation import CLIPModel, create_clip_model, load_clip_config
from ..tokenizer.byte import ByteCLIPTokenizer
from ..memory import retain_freed_memory
from ..download import LOCAL_CHECKPOINTS, MODEL_PATHS, checkpoint_path, is_cloud_path, load_checkpoint
from ..model_creation import (
    create_gaussian_diffusion,
    create_model_and_diffusion,
    make_tokenizer,
    model_and_diffusion_defaults,
    model_and_diffusion_defaults_upsampler,
)
from ..respace import SpacedDiffusion
from ..samplers import get_timesteps
from ..text2im_model import Text2ImUNet
from .validation import load_weights

Options = Dict[str, Any]

CHECKPOINT_OPTIONS: Dict[str, Callable[[], Options]] = {
    "base": model_and_diffusion_defaults,
    "upsample": model_and_diffusion_defaults_upsampler,
    "base-inpaint": lambda: dict(model_and_diffusion_defaults(), inpaint=True),
    "upsample-inpaint": lambda: dict(model_and_diffusion_defaults_upsampler(), inpaint=True),
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_OPTION_NAMES = tuple(inspect.signature(create_model_and_diffusion).parameters)
_OPTIONAL_OPTIONS = ("tokenizer", "norm_groups", "prediction")
# Files that describe a checkpoint file, named ``<checkpoint file><suffix>``: the U-Net
# options (JSON) and the noised CLIP config (YAML, beside the image encoder).
SIDECAR_SUFFIXES = (".json", ".yaml")


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the model's text context."""


def register_checkpoint_options(name: str, options: Union[Options, Callable[[], Options]]) -> None:
    """Make checkpoint ``name`` load with ``options`` (a dict, or a function returning one)."""
    if name in CHECKPOINT_OPTIONS and name in MODEL_PATHS:
        raise ValueError(f"{name!r} is an official checkpoint; its options cannot be replaced")
    CHECKPOINT_OPTIONS[name] = options if callable(options) else (lambda: dict(options))


def options_path(checkpoint_file: str) -> str:
    """The sidecar options file of a checkpoint file: ``<checkpoint_file>.json``."""
    return os.fspath(checkpoint_file) + ".json"


def save_options(checkpoint_file: str, options: Options) -> str:
    """Write ``options`` as the sidecar JSON of ``checkpoint_file``; returns the sidecar's path."""
    path = options_path(checkpoint_file)
    with open(path, "w", encoding="utf-8") as f:
        f.write(options_json(options))
    return path


def options_json(options: Options) -> str:
    """The text of an options sidecar: ``options`` (checked) as indented JSON with sorted keys."""
    check_options(options, source="options")
    return json.dumps(options, indent=2, sort_keys=True) + "\n"


def check_options(options: Options, source: str) -> None:
    """Raise a ValueError if ``options`` cannot be passed to ``create_model_and_diffusion``."""
    if not isinstance(options, dict):
        raise ValueError(f"{source} must be a dict of model options, got {type(options).__name__}")
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    missing = sorted(set(_OPTION_NAMES) - set(options) - set(_OPTIONAL_OPTIONS))
    if unknown or missing:
        raise ValueError(
            f"{source} are not model_and_diffusion options: unknown keys {unknown}, missing keys {missing}"
        )


def is_local_checkpoint(name: str) -> bool:
    """True for a registered local name or an existing file (nothing to download)."""
    return name in LOCAL_CHECKPOINTS or (name not in MODEL_PATHS and os.path.isfile(name))


def check_checkpoint_name(name: str) -> None:
    """Raise a ValueError unless ``name`` is a known checkpoint name or an existing file."""
    if name in MODEL_PATHS or is_local_checkpoint(name):
        return
    checkpoint_path(name)  # raises the ValueError that lists the known names


def checkpoint_options(checkpoint: str, options: Optional[Options] = None) -> Options:
    """The model options of ``checkpoint`` (see the module docstring for where they come from)."""
    if options is not None:
        source = "the options argument"
        options = dict(options)
    elif checkpoint in CHECKPOINT_OPTIONS:
        source = f"the registered options of {checkpoint!r}"
        options = CHECKPOINT_OPTIONS[checkpoint]()
    else:
        check_checkpoint_name(checkpoint)
        if not is_local_checkpoint(checkpoint):
            raise ValueError(f"no model options are known for checkpoint {checkpoint!r}: pass options=")
        sidecar = options_path(checkpoint_path(checkpoint))
        if not os.path.isfile(sidecar):
            raise ValueError(
                f"no model options for checkpoint {checkpoint!r}: pass options= or write them as JSON to {sidecar}"
            )
        source = f"the options in {sidecar}"
        with open(sidecar, encoding="utf-8") as f:
            try:
                options = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{sidecar} is not valid JSON: {exc}") from None
    check_options(options, source)
    return options


def pick_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device`` if given (``"auto"`` counts as not given), else CUDA, else Apple MPS, else CPU."""
    if device is not None and str(device) != "auto":
        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}: expected e.g. 'cuda', 'cuda:1', 'mps' or 'cpu'") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {device} was asked for but Apple MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: Optional[Union[str, torch.dtype]], device: torch.device) -> torch.dtype:
    """``dtype`` (a torch dtype or one of ``DTYPES``), else float16 on CUDA and float32 elsewhere."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def set_precision(model: Text2ImUNet, dtype: torch.dtype) -> None:
    """Run the half-precision parts of ``model`` (see the module docstring) in ``dtype``."""
    model.convert_to_fp32()
    if dtype == torch.float32:
        return
    model.convert_to_fp16()
    if dtype == torch.bfloat16:
        for parameter in model.parameters():
            if parameter.dtype == torch.float16:
                parameter.data = parameter.data.to(torch.bfloat16)


@dataclass
class LoadedModel:
    """A U-Net in eval mode with the options it was built from and its full diffusion chain
    (``diffusion``: every one of its ``diffusion_steps`` timesteps; the samplers pick theirs from it)."""

    model: Text2ImUNet
    options: Options
    name: str = "model"
    diffusion: SpacedDiffusion = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.diffusion = create_gaussian_diffusion(
            self.options["diffusion_steps"], self.options["noise_schedule"],
            prediction=self.options.get("prediction", "eps"),
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return self.options["image_size"]

    @property
    def text_ctx(self) -> int:
        return self.options["text_ctx"]

    def text_kwargs(self, prompts: Sequence[Optional[str]], truncate: bool = False) -> Dict[str, torch.Tensor]:
        """Model kwargs for one row per prompt (``None`` = the unconditional row).

        :return: ``{"tokens": [N x text_ctx] int64, "mask": [N x text_ctx] bool}`` on the model's device.
        """
        tokenizer = self.model.tokenizer
        rows, masks = [], []
        for prompt in prompts:
            tokens = [] if prompt is None else tokenizer.encode(prompt)
            if len(tokens) > self.text_ctx and not truncate:
                raise prompt_too_long(prompt, len(tokens), self.text_ctx)
            row, mask = tokenizer.padded_tokens_and_mask(tokens, self.text_ctx)
            rows.append(row)
            masks.append(mask)
        device = self.device
        return dict(
            tokens=torch.tensor(rows, dtype=torch.long, device=device),
            mask=torch.tensor(masks, dtype=torch.bool, device=device),
        )


def check_steps(steps: Union[str, int], options: Options, spacing: Optional[str] = None) -> List[int]:
    """The timesteps ``steps`` and ``spacing`` pick (see ``samplers.get_timesteps``) from the full
    chain of a model built from ``options``; raises a one-line error for steps it cannot take."""
    diffusion = create_gaussian_diffusion(options["diffusion_steps"], options["noise_schedule"])
    return get_timesteps(diffusion, steps, spacing)


def prompt_too_long(prompt: str, num_tokens: int, text_ctx: int) -> PromptTooLongError:
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return PromptTooLongError(
        f"prompt {shown!r} has {num_tokens} tokens but the model reads at most {text_ctx} (text_ctx): shorten it"
    )


def check_prompt_lengths(prompts: Sequence[str], options: Options) -> None:
    """Raise :class:`PromptTooLongError` for the first prompt longer than ``options["text_ctx"]`` tokens.

    Uses the tokenizer the options name without building the model.
    """
    tokenizer = make_tokenizer(options.get("tokenizer", "bpe"))
    if tokenizer is None:
        from ..tokenizer.bpe import get_encoder

        tokenizer = get_encoder()
    for prompt in prompts:
        num_tokens = len(tokenizer.encode(prompt))
        if num_tokens > options["text_ctx"]:
            raise prompt_too_long(prompt, num_tokens, options["text_ctx"])


def load_model(
    checkpoint: str,
    options: Optional[Options] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[Union[str, torch.dtype]] = None,
    progress: bool = True,
) -> LoadedModel:
    """Build the U-Net of ``checkpoint`` (official name, registered name, ``.pt`` or ``.safetensors``
    file), load its weights strictly, move it to ``device`` (default: :func:`pick_device`) and set its precision.

    On a CPU the process then keeps freed activation memory for reuse (see ``glide_text2im.memory``)
    and the convolution weights are stored channels-last (NHWC), which oneDNN's kernels run faster;
    neither changes the maths: the outputs differ from the NCHW model's by float32 rounding only
    (1e-6 to 4e-6 of their scale on the demo and full-size models)."""
    options = checkpoint_options(checkpoint, options)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    if device.type == "cpu":
        retain_freed_memory()
    build_options = dict(options, use_fp16=False, cache_text_emb=False, timestep_respacing="")
    model, _ = create_model_and_diffusion(**build_options)
    load_weights(model, load_checkpoint(checkpoint, "cpu", progress=progress), checkpoint)
    model.eval()
    model.to(device)
    set_precision(model, dtype)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return LoadedModel(model, options, name=checkpoint)


def load_clip(
    image_checkpoint: str = "clip/image-enc",
    text_checkpoint: str = "clip/text-enc",
    config: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> CLIPModel:
    """The noised CLIP in float32 and eval mode.

    Its YAML config is ``config`` if given, else the sidecar ``<image checkpoint file>.yaml``
    next to a local image-encoder file if there is one, else the official config. A config
    with the byte vocabulary (258 ids, the demo CLIP) reads captions with ``ByteCLIPTokenizer``.
    """
    device = pick_device(device)
    if config is None and is_local_checkpoint(image_checkpoint):
        sidecar = checkpoint_path(image_checkpoint) + ".yaml"
        config = sidecar if os.path.isfile(sidecar) else None
    clip = create_clip_model(config_path=config, device=device, tokenizer=clip_tokenizer(config))
    clip.image_encoder.load_state_dict(load_checkpoint(image_checkpoint, device, progress=progress))
    clip.text_encoder.load_state_dict(load_checkpoint(text_checkpoint, device, progress=progress))
    clip.eval()
    return clip


def clip_tokenizer(config: Optional[str]) -> Optional[Any]:
    """The caption tokenizer of a CLIP with YAML ``config``: the byte-level one when its
    vocabulary is the byte vocabulary (the demo CLIP), else None (the CLIP BPE, built on first use)."""
    tokenizer = ByteCLIPTokenizer()
    return tokenizer if load_clip_config(config)["n_vocab"] == tokenizer.n_vocab else None


def check_model_kind(loaded: LoadedModel, role: str, inpaint: bool, super_res: bool) -> None:
    """Raise a ValueError unless the model's ``inpaint`` / ``super_res`` options fit ``role``."""
    kind = (bool(loaded.options["inpaint"]), bool(loaded.options["super_res"]))
    if kind != (inpaint, super_res):
        names = {
            (False, False): "a text-to-image base model",
            (True, False): "an inpainting base model",
            (False, True): "an upsampler",
            (True, True): "an inpainting upsampler",
        }
        raise ValueError(f"{role} must be {names[(inpaint, super_res)]}, but {loaded.name!r} is {names[kind]}")


@dataclass
class ConvertedCheckpoint:
    """What :func:`convert_checkpoint` wrote: the checkpoint file, its tensor count, its size in
    bytes and the sidecar files written beside it."""

    path: str
    num_tensors: int
    num_bytes: int
    sidecars: List[str]


def convert_checkpoint(
    source: str, destination: str, overwrite: bool = False, progress: bool = True
) -> ConvertedCheckpoint:
    """Rewrite checkpoint ``source`` (a name or a file, see ``download.checkpoint_path``) as the
    file ``destination``, in safetensors if it ends in ``.safetensors``, else (``.pt``) in torch's
    format, with the same tensors (dtype, shape and values).

    The source's sidecars (``SIDECAR_SUFFIXES``) are copied beside ``destination``; a name with
    registered options (an official U-Net) that has no ``.json`` sidecar gets one holding them,
    so the new file loads with :func:`load_model` on its own. An existing ``destination`` or
    destination sidecar is an error unless ``overwrite``, which also removes destination sidecars
    the source lacks. Nothing is written unless the source was read whole.
    """
    if not destination.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(f"destination {destination} must end in {' or '.join(CHECKPOINT_SUFFIXES)}")
    folder = os.path.dirname(os.path.abspath(destination))
    if not os.path.isdir(folder):
        raise ValueError(f"destination folder {folder} does not exist")
    source_file = checkpoint_path(source, progress=progress)
    if is_cloud_path(source_file):
        raise ValueError(f"{source_file} is not a local file: convert reads local checkpoint files only")
    if os.path.exists(destination) and os.path.samefile(source_file, destination):
        raise ValueError(f"{destination} is the source file itself: pick another destination")
    targets = [destination] + [destination + suffix for suffix in SIDECAR_SUFFIXES]
    existing = [path for path in targets if os.path.exists(path)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists: pass --overwrite (overwrite=True) to replace it")
    sidecars = _sidecar_texts(source, source_file)
    state_dict = read_state_dict(source_file, "cpu")
    staged = {}  # destination sidecar -> the temporary file holding its text
    try:
        for suffix, text in sidecars.items():
            staged[destination + suffix] = temporary_path(destination + suffix)
            with open(staged[destination + suffix], "w", encoding="utf-8") as f:
                f.write(text)
        write_state_dict(state_dict, destination)
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    for path in targets[1:]:
        if path not in staged and os.path.exists(path):
            os.remove(path)  # a sidecar of the file that was replaced
    return ConvertedCheckpoint(destination, len(state_dict), os.path.getsize(destination), list(staged))


def _sidecar_texts(source: str, source_file: str) -> Dict[str, str]:
    """Sidecar suffix -> text for the converted file: the source file's sidecars, plus the
    registered options of a name that has none."""
    texts = {}
    for suffix in SIDECAR_SUFFIXES:
        if os.path.isfile(source_file + suffix):
            with open(source_file + suffix, encoding="utf-8") as f:
                texts[suffix] = f.read()
    if ".json" not in texts and source in CHECKPOINT_OPTIONS:
        texts[".json"] = options_json(checkpoint_options(source))
    return texts

