"""Factories for the models and diffusion processes, driven by an options dict.

    options = model_and_diffusion_defaults()
    options["timestep_respacing"] = "100"
    model, diffusion = create_model_and_diffusion(**options)
"""

from typing import Any, Dict, Tuple, Union

from .gaussian_diffusion import get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps
from .text2im_model import InpaintText2ImUNet, SuperResInpaintText2ImUnet, SuperResText2ImUNet, Text2ImUNet

TOKENIZERS = ("bpe", "byte")


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Options of the official 64×64 base model (``base`` and, with ``inpaint=True``, ``base-inpaint``)."""
    return dict(
        image_size=64,
        num_channels=192,
        num_res_blocks=3,
        channel_mult="",
        num_heads=1,
        num_head_channels=64,
        num_heads_upsample=-1,
        attention_resolutions="32,16,8",
        dropout=0.1,
        text_ctx=128,
        xf_width=512,
        xf_layers=16,
        xf_heads=8,
        xf_final_ln=True,
        xf_padding=True,
        diffusion_steps=1000,
        noise_schedule="squaredcos_cap_v2",
        timestep_respacing="",
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_fp16=True,
        cache_text_emb=False,
        inpaint=False,
        super_res=False,
    )


def model_and_diffusion_defaults_upsampler() -> Dict[str, Any]:
    """Options of the official 64→256 upsampler (``upsample`` and ``upsample-inpaint``)."""
    options = model_and_diffusion_defaults()
    options.update(image_size=256, num_res_blocks=2, noise_schedule="linear", super_res=True)
    return options


def create_model_and_diffusion(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str,
    num_heads: int,
    num_head_channels: int,
    num_heads_upsample: int,
    attention_resolutions: str,
    dropout: float,
    text_ctx: int,
    xf_width: int,
    xf_layers: int,
    xf_heads: int,
    xf_final_ln: bool,
    xf_padding: bool,
    diffusion_steps: int,
    noise_schedule: str,
    timestep_respacing: Union[str, list],
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    use_fp16: bool,
    cache_text_emb: bool,
    inpaint: bool,
    super_res: bool,
    tokenizer: str = "bpe",
    norm_groups: int = 32,
    prediction: str = "eps",
) -> Tuple[Text2ImUNet, SpacedDiffusion]:
    """Build the U-Net and its (respaced) diffusion from an options dict.

    Beyond ``model_and_diffusion_defaults()``: ``tokenizer`` ("bpe" or "byte"),
    ``norm_groups`` (GroupNorm groups) and ``prediction`` (what the model's mean channels
    predict, "eps" or "v"; see glide_text2im.gaussian_diffusion). Every official model has
    "bpe", 32 and "eps".
    """
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        text_ctx=text_ctx,
        xf_width=xf_width,
        xf_layers=xf_layers,
        xf_heads=xf_heads,
        xf_final_ln=xf_final_ln,
        xf_padding=xf_padding,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        cache_text_emb=cache_text_emb,
        inpaint=inpaint,
        super_res=super_res,
        tokenizer=tokenizer,
        norm_groups=norm_groups,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        noise_schedule=noise_schedule,
        timestep_respacing=timestep_respacing,
        prediction=prediction,
    )
    return model, diffusion


def resolve_channel_mult(image_size: int, channel_mult: Union[str, Tuple[int, ...]]) -> Tuple[int, ...]:
    """The per-level width multipliers: the official ones for "" or a comma list "1,2,3,4"."""
    if channel_mult == "":
        official = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if image_size not in official:
            raise ValueError(
                f"no default channel_mult for image_size {image_size} (known: 64, 128, 256); pass channel_mult explicitly"
            )
        return official[image_size]
    mult = tuple(int(c) for c in channel_mult.split(",")) if isinstance(channel_mult, str) else tuple(channel_mult)
    if 2 ** (len(mult) + 2) != image_size:
        raise ValueError(
            f"channel_mult {channel_mult!r} has {len(mult)} levels, which fits image_size {2 ** (len(mult) + 2)}, "
            f"not {image_size} (image_size must be 2**(levels + 2))"
        )
    return mult


def make_tokenizer(name: str) -> Any:
    """The prompt encoder for a ``tokenizer`` option: ``None`` (GPT-2 BPE, loaded lazily) or a byte encoder."""
    if name == "bpe":
        return None
    if name == "byte":
        from .tokenizer.byte import ByteEncoder

        return ByteEncoder()
    raise ValueError(f"unknown tokenizer {name!r}; expected one of {TOKENIZERS}")


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str,
    attention_resolutions: str,
    num_heads: int,
    num_head_channels: int,
    num_heads_upsample: int,
    use_scale_shift_norm: bool,
    dropout: float,
    text_ctx: int,
    xf_width: int,
    xf_layers: int,
    xf_heads: int,
    xf_final_ln: bool,
    xf_padding: bool,
    resblock_updown: bool,
    use_fp16: bool,
    cache_text_emb: bool,
    inpaint: bool,
    super_res: bool,
    tokenizer: str = "bpe",
    use_checkpoint: bool = False,
    norm_groups: int = 32,
) -> Text2ImUNet:
    """Build the text-conditional U-Net class that matches ``inpaint`` / ``super_res``."""
    mult = resolve_channel_mult(image_size, channel_mult)
    attention_ds = tuple(image_size // int(res) for res in attention_resolutions.split(","))
    if inpaint and super_res:
        model_cls = SuperResInpaintText2ImUnet
    elif inpaint:
        model_cls = InpaintText2ImUNet
    elif super_res:
        model_cls = SuperResText2ImUNet
    else:
        model_cls = Text2ImUNet
    return model_cls(
        text_ctx=text_ctx,
        xf_width=xf_width,
        xf_layers=xf_layers,
        xf_heads=xf_heads,
        xf_final_ln=xf_final_ln,
        tokenizer=make_tokenizer(tokenizer),
        xf_padding=xf_padding,
        cache_text_emb=cache_text_emb,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6,
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        dropout=dropout,
        channel_mult=mult,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        norm_groups=norm_groups,
    )


def create_gaussian_diffusion(
    steps: int = 1000,
    noise_schedule: str = "linear",
    timestep_respacing: Union[str, list] = "",
    prediction: str = "eps",
) -> SpacedDiffusion:
    """The ``steps``-step diffusion with ``noise_schedule``, keeping the steps ``timestep_respacing``
    names, for a model whose mean channels predict ``prediction`` ("eps" or "v")."""
    betas = get_named_beta_schedule(noise_schedule, steps)
    if not timestep_respacing:
        timestep_respacing = [steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing), betas=betas, prediction=prediction
    )
