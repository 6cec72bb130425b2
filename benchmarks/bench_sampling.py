"""Seconds per denoising step and per 256x256 image: the plain path against the fast path, and the samplers.

Builds the full-size ``base`` (64x64) and ``upsample`` (64 -> 256) models with seeded random
weights (every parameter randomised, so nothing is zero) and prints, in one run on one machine:

- seconds per base step with classifier-free guidance (batch 2: prompt + empty prompt, 64x64)
  and per upsampler step (batch 1, 256x256), for (a) the plain path (reference attention, text
  transformer run at every step: what the original code does) and (b) the fast path (the
  package's defaults: ``scaled_dot_product_attention``, the text embedding computed once and,
  on a CPU, channels-last convolution weights and freed activation memory kept for reuse);
- their ratio, GFLOP per step (``torch.utils.flop_counter``), the fraction of the machine's
  measured GEMM rate each reaches, peak memory, and the max abs difference of (a) and (b);
- seconds per whole 256x256 image for the notebook's settings (100 ancestral CFG base steps +
  DDIM "fast27" upsampler) and for the fast samplers (25 base + 10 upsampler steps), estimated
  as steps x measured step time + measured overhead, or timed end to end with ``--full-image``.

    python benchmarks/bench_sampling.py                 # full size, CPU float32
    python benchmarks/bench_sampling.py --small         # tiny models: checks that everything runs
    python benchmarks/bench_sampling.py --device cuda --dtype float16 --full-image
    python benchmarks/bench_sampling.py --device cuda --dtype float16 --full-image --cuda-graphs

``--cuda-graphs`` adds (c): the fast path replayed from a CUDA graph (``glide_text2im.cuda_graphs``).
"""

import argparse
import math
import platform
import resource
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from glide_text2im.model_creation import (
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_and_diffusion_defaults_upsampler,
)
from glide_text2im.cuda_graphs import CUDAGraphStep
from glide_text2im.guidance import ClassifierFreeGuidance
from glide_text2im.memory import retain_freed_memory
from glide_text2im.samplers import SAMPLERS

GUIDANCE_SCALE = 3.0
UPSAMPLE_TEMP = 0.997
SMALL_OPTIONS = dict(
    num_channels=32, num_res_blocks=1, num_head_channels=16, text_ctx=16, xf_width=32, xf_layers=1, xf_heads=2
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny models (16x16 base, 64x64 upsampler) to check the script")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="float16: model.convert_to_fp16(); bfloat16: the same parameters in bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the median is reported)")
    parser.add_argument("--full-image", action="store_true", help="time whole images instead of estimating them")
    parser.add_argument("--base-steps", type=int, default=25, help="base steps of the fast samplers")
    parser.add_argument("--upsample-steps", type=int, default=10, help="upsampler steps of the fast samplers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda-graphs", action="store_true", help="also time (c): the fast path from CUDA graphs")
    return parser.parse_args()


# ---------------------------------------------------------------------- models and inputs


def build_model(kind: str, small: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """The ``base`` or ``upsample`` model (random weights, eval mode) and its options."""
    options = model_and_diffusion_defaults_upsampler() if kind == "upsample" else model_and_diffusion_defaults()
    options["use_fp16"] = False
    if small:
        options.update(SMALL_OPTIONS)
        if kind == "upsample":
            options.update(image_size=64, channel_mult="1,1,2,2", attention_resolutions="32,16,8")
        else:
            options.update(image_size=16, channel_mult="1,2", attention_resolutions="8")
    model, _ = create_model_and_diffusion(**options)
    randomize_(model, seed)
    model.eval().to(device)
    if dtype != torch.float32:
        model.convert_to_fp16()
        for p in model.parameters():
            if p.dtype == torch.float16:
                p.data = p.data.to(dtype)
    return model, options


def randomize_(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter, in order, from one seeded generator: norm gains
    1 + 0.1 N(0,1), norm biases 0.05 N(0,1), matrices N(0,1) / sqrt(fan_in), other vectors 0.05 N(0,1)."""
    generator = torch.Generator().manual_seed(seed)
    norm_prefixes = {name + "." for name, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            prefix, _, leaf = name.rpartition(".")
            if prefix + "." in norm_prefixes:
                p.copy_(1 + 0.1 * noise if leaf == "weight" else 0.05 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p.numel() / p.shape[0]))
            else:
                p.copy_(0.05 * noise)


def prompt_kwargs(model, prompts: int, unconditional: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """tokens/mask for ``prompts`` rows of a fixed 9-token prompt, then ``unconditional`` empty rows."""
    rows, text_ctx = prompts + unconditional, model.text_ctx
    end_token = model.token_embedding.num_embeddings - 1
    tokens = torch.full((rows, text_ctx), end_token, dtype=torch.long)
    mask = torch.zeros(rows, text_ctx, dtype=torch.bool)
    length = min(9, text_ctx)
    tokens[:prompts, :length] = torch.arange(1000, 1000 + length)
    mask[:prompts, :length] = True
    return dict(tokens=tokens.to(device), mask=mask.to(device))


# ---------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> Tuple[float, Any]:
    """Median seconds of ``repeats`` calls (after the caller's warm-up) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n matrix multiply in ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    a @ b
    seconds, _ = timed(lambda: a @ b, max(repeats, 5), device)
    return 2 * n**3 / seconds


def counted_call(fn: Callable[[], Any]) -> Tuple[float, Any]:
    """FLOPs of one call (matmuls and convolutions, as counted by FlopCounterMode) and its result."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return float(counter.get_total_flops()), result


class PeakMemory:
    """Peak memory of a block in MiB: CUDA max_memory_allocated, or the process RSS high-water mark
    (reset through /proc/self/clear_refs where Linux allows, else the peak since the start)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = float("nan")
        self.since_start = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.since_start = True
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20

    def __str__(self) -> str:
        kind = "allocated" if self.device.type == "cuda" else "RSS" + (" since start" if self.since_start else "")
        return f"{self.mib:,.0f} MiB {kind}"


# ---------------------------------------------------------------------- per-step benchmark


def set_path(model, fast: bool, device: torch.device) -> None:
    """Put ``model`` on the fast path (b): ``scaled_dot_product_attention`` and, on a CPU,
    channels-last convolution weights (as ``load_model`` stores them there); or on the plain
    path (a): the reference attention and NCHW weights."""
    model.use_fast_attention(fast)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last if fast else torch.contiguous_format)


def step_benchmark(label: str, model, step: Callable[[Dict[str, torch.Tensor]], torch.Tensor],
                   kwargs: Dict[str, torch.Tensor], device: torch.device, repeats: int) -> Dict[str, Any]:
    """Time ``step(kwargs)`` on the plain path (a); ``finish_step_benchmark`` adds the fast path (b)."""

    def fresh() -> Dict[str, torch.Tensor]:
        """New prompt tensors: the model cannot reuse its text embedding, as in the original code."""
        return dict(kwargs, tokens=kwargs["tokens"].clone(), mask=kwargs["mask"].clone())

    def encode_text() -> Dict[str, torch.Tensor]:
        prompt = fresh()
        return model.get_text_emb(prompt["tokens"], prompt["mask"])

    result: Dict[str, Any] = {"label": label, "model": model, "step": step, "kwargs": kwargs}
    with torch.no_grad():
        text_flops, _ = counted_call(encode_text)
        result["text_s"], _ = timed(encode_text, 1, device)

        set_path(model, False, device)
        with PeakMemory(device) as memory:
            result["plain_flops"], _ = counted_call(lambda: step(fresh()))  # also the warm-up
            result["plain_s"], result["plain_out"] = timed(lambda: step(fresh()), repeats, device)
        result["plain_memory"] = memory
    # SDPA is not counted by FlopCounterMode on every backend; it does the reference attention's matmuls.
    result["fast_flops"] = result["plain_flops"] - text_flops
    return result


def finish_step_benchmark(result: Dict[str, Any], device: torch.device, repeats: int,
                          graph_step: Optional[Callable] = None) -> Dict[str, Any]:
    """Add the fast path (b) to a ``step_benchmark`` result: SDPA, the prompt encoded once, and on
    a CPU channels-last weights and the allocator keeping freed activations (enabled by ``main``
    before the first call);
    and (c), ``graph_step`` (the same step from a CUDA graph), when given."""
    model, step, kwargs = result.pop("model"), result.pop("step"), result.pop("kwargs")
    with torch.no_grad():
        set_path(model, True, device)
        with PeakMemory(device) as memory:
            step(kwargs)  # warm-up; encodes the prompt once
            result["fast_s"], fast_out = timed(lambda: step(kwargs), repeats, device)
        result["fast_memory"] = memory
        if graph_step is not None:
            with PeakMemory(device) as memory:
                graph_step(kwargs)  # records the graph
                result["graph_s"], graph_out = timed(lambda: graph_step(kwargs), repeats, device)
            result["graph_memory"] = memory
            result["graph_flops"] = result["plain_flops"]  # the graph runs the text transformer too
            result["graph_diff"] = (graph_out.float() - fast_out.float()).abs().max().item()
    plain_out = result.pop("plain_out")
    diff = (plain_out.float() - fast_out.float()).abs().max().item()
    result["max_abs_diff"] = diff
    result["rel_diff"] = diff / plain_out.float().abs().max().item()
    result["finite"] = bool(torch.isfinite(plain_out).all() and torch.isfinite(fast_out).all())
    return result


def print_step_results(results: List[Dict[str, Any]], gemm: float) -> None:
    print("\nPer step ((a) plain path: reference attention, text transformer every step; (b) fast path: defaults)")
    header = f"{'':<34}{'s/step':>10}{'GFLOP':>10}{'GFLOP/s':>10}{'of GEMM':>9}  peak memory"
    print(header)
    for r in results:
        for path, letter in (("plain", "a"), ("fast", "b"), ("graph", "c")):
            if f"{path}_s" not in r:
                continue
            seconds, flops = r[f"{path}_s"], r[f"{path}_flops"]
            name = f"{r['label']} ({letter}) {path}"
            print(f"{name:<34}{seconds:>10.4f}{flops / 1e9:>10.1f}{flops / seconds / 1e9:>10.1f}"
                  f"{flops / seconds / gemm:>8.0%}  {r[f'{path}_memory']}")
        print(f"{'':<4}speed-up (a)/(b) {r['plain_s'] / r['fast_s']:.2f}x; max |a - b| {r['max_abs_diff']:.2e} "
              f"({r['rel_diff']:.1e} of max |a|); all finite: {r['finite']}; "
              f"text encoder {r['text_s']:.4f} s once per image on (b)")
        if "graph_s" in r:
            print(f"{'':<4}CUDA graph (c) vs (b): {r['fast_s'] / r['graph_s']:.2f}x; max |c - b| {r['graph_diff']:.2e}")


# ---------------------------------------------------------------------- whole images


def image_settings(base_steps: int, upsample_steps: int, cuda_graphs: bool) -> List[Dict[str, Any]]:
    notebook = dict(base="ancestral", base_steps=100, up="ddim_fast27", up_steps=27)
    settings = [dict(notebook, name="notebook (a) plain", path="plain"), dict(notebook, name="notebook (b) fast", path="fast")]
    if cuda_graphs:
        settings.append(dict(notebook, name="notebook (c) graphs", path="graph"))
    for path, letter in (("fast", "b"), ("graph", "c")) if cuda_graphs else (("fast", "b"),):
        for sampler in SAMPLERS:
            settings.append(dict(name=f"{sampler} ({letter}) {path}", path=path, base=sampler, base_steps=base_steps,
                                 up=sampler, up_steps=upsample_steps))
    return settings


def uncached(model) -> Callable[..., torch.Tensor]:
    """``model`` called with copies of the prompt tensors, so it encodes the prompt at every step
    (what the original code does)."""

    def model_fn(x, t, tokens, mask, **kwargs):
        return model(x, t, tokens=tokens.clone(), mask=mask.clone(), **kwargs)

    return model_fn


def generate_image(setting: Dict[str, Any], base, base_options, up, up_options, device: torch.device,
                   generator: torch.Generator, model_fn: Optional[Callable] = None,
                   up_model: Optional[Callable] = None) -> torch.Tensor:
    """One 256x256 image [1 x 3 x H x W] in [-1, 1]: base sampling with CFG, then the upsampler.

    ``model_fn`` / ``up_model`` replace the networks (to time the sampler arithmetic alone).
    """
    base_size, up_size = base_options["image_size"], up_options["image_size"]
    base_kwargs, up_prompt = prompt_kwargs(base, 1, 1, device), prompt_kwargs(up, 1, 0, device)
    if setting["path"] == "plain":
        base, up = uncached(base), uncached(up)
    model_fn = model_fn or ClassifierFreeGuidance(base, GUIDANCE_SCALE)
    if setting["path"] == "graph":
        model_fn, up = CUDAGraphStep(model_fn), CUDAGraphStep(up)
    base_shape = (2, 3, base_size, base_size)
    base_noise = torch.randn(base_shape, generator=generator, device=device)
    if setting["base"] == "ancestral":
        diffusion = create_gaussian_diffusion(1000, base_options["noise_schedule"], str(setting["base_steps"]))
        samples = diffusion.p_sample_loop(model_fn, base_shape, noise=base_noise, model_kwargs=base_kwargs,
                                          device=device, generator=generator)
    else:
        diffusion = create_gaussian_diffusion(1000, base_options["noise_schedule"], "")
        samples = SAMPLERS[setting["base"]](model_fn, diffusion, base_shape, steps=setting["base_steps"],
                                            noise=base_noise, model_kwargs=base_kwargs)
    low_res = ((samples[:1] + 1) * 127.5).round() / 127.5 - 1
    up_kwargs = dict(up_prompt, low_res=low_res)
    up_model = up_model or up
    up_shape = (1, 3, up_size, up_size)
    up_noise = torch.randn(up_shape, generator=generator, device=device) * UPSAMPLE_TEMP
    if setting["up"] == "ddim_fast27":
        diffusion = create_gaussian_diffusion(1000, up_options["noise_schedule"], "fast27")
        return diffusion.ddim_sample_loop(up_model, up_shape, noise=up_noise, model_kwargs=up_kwargs, device=device,
                                          generator=generator)
    diffusion = create_gaussian_diffusion(1000, up_options["noise_schedule"], "")
    return SAMPLERS[setting["up"]](up_model, diffusion, up_shape, steps=setting["up_steps"], noise=up_noise,
                                   model_kwargs=up_kwargs)


def stand_in(channels: int = 6) -> Callable[..., torch.Tensor]:
    """A zero-cost model: returns one preallocated output per input shape."""
    outputs: Dict[Tuple, torch.Tensor] = {}

    def model(x, t, **kwargs):
        key = (tuple(x.shape), x.device)
        if key not in outputs:
            outputs[key] = torch.zeros(x.shape[0], channels, *x.shape[2:], device=x.device)
        return outputs[key]

    return model


def image_benchmark(args, base, base_options, up, up_options, steps: Dict[str, Dict[str, Any]],
                    device: torch.device) -> None:
    generator = torch.Generator(device=device).manual_seed(args.seed)
    size = up_options["image_size"]
    print(f"\nSeconds per {size}x{size} image (" + ("timed end to end" if args.full_image else
          "estimated: steps x measured s/step + measured overhead = text encoding on the fast path + "
          "the sampler's own arithmetic, timed with a zero-cost stand-in model") + ")")
    print(f"{'setting':<26}{'base':>18}{'upsampler':>18}{'s/image':>11}{'vs notebook (a)':>17}")
    reference = None
    for setting in image_settings(args.base_steps, args.upsample_steps, args.cuda_graphs):
        path = setting["path"]
        with torch.no_grad():
            set_path(base, path != "plain", device)
            set_path(up, path != "plain", device)
            if args.full_image:
                seconds, image = timed(lambda: generate_image(setting, base, base_options, up, up_options, device,
                                                              generator), 1, device)
                assert torch.isfinite(image).all(), "the image has NaNs"
            else:
                arithmetic, _ = timed(lambda: generate_image(setting, base, base_options, up, up_options, device,
                                                             generator, stand_in(), stand_in()), 1, device)
                text = steps["base"]["text_s"] + steps["upsample"]["text_s"] if path == "fast" else 0.0
                seconds = (setting["base_steps"] * steps["base"][f"{path}_s"]
                           + setting["up_steps"] * steps["upsample"][f"{path}_s"] + text + arithmetic)
        reference = reference or seconds
        print(f"{setting['name']:<26}{setting['base'] + ' x' + str(setting['base_steps']):>18}"
              f"{setting['up'] + ' x' + str(setting['up_steps']):>18}{seconds:>11.2f}{reference / seconds:>16.2f}x")


# ---------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit("--cuda-graphs needs --device cuda")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({platform.processor() or platform.machine()})")
          + f", {torch.get_num_threads()} threads, dtype {args.dtype}, {'small' if args.small else 'full-size'} models, "
          f"{args.repeats} repeats (median)")
    gemm_size = 512 if args.small else 2048
    gemm = gemm_rate(device, dtype, gemm_size, args.repeats)
    print(f"GEMM {gemm_size}^3 {args.dtype}: {gemm / 1e9:.1f} GFLOP/s (median of {max(args.repeats, 5)})")

    base, base_options = build_model("base", args.small, device, dtype, args.seed)
    up, up_options = build_model("upsample", args.small, device, dtype, args.seed + 1)
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"base {n_params(base):.1f} M parameters, upsampler {n_params(up):.1f} M parameters")

    generator = torch.Generator().manual_seed(args.seed)
    base_size, up_size = base_options["image_size"], up_options["image_size"]
    base_x = torch.randn(2, 3, base_size, base_size, generator=generator).to(device)
    base_t = torch.full((2,), 500, dtype=torch.long, device=device)
    model_fn = ClassifierFreeGuidance(base, GUIDANCE_SCALE)
    up_x = torch.randn(1, 3, up_size, up_size, generator=generator).to(device)
    up_t = torch.full((1,), 500, dtype=torch.long, device=device)
    low_res = torch.rand(1, 3, base_size, base_size, generator=generator).to(device) * 2 - 1

    steps = {
        "base": step_benchmark(f"base CFG {base_size}x{base_size} b2", base, lambda kw: model_fn(base_x, base_t, **kw),
                               prompt_kwargs(base, 1, 1, device), device, args.repeats),
        "upsample": step_benchmark(f"upsampler {up_size}x{up_size} b1", up, lambda kw: up(up_x, up_t, **kw),
                                   dict(prompt_kwargs(up, 1, 0, device), low_res=low_res), device, args.repeats),
    }
    # The plain paths above ran with the default allocator; the process-wide setting that keeps
    # freed activation memory (what the pipelines enable on a CPU) applies from here on.
    if device.type == "cpu":
        print(f"allocator keeps freed memory from here on: {retain_freed_memory()}")
    graph_steps = {}
    if args.cuda_graphs:
        graphed_base, graphed_up = CUDAGraphStep(model_fn), CUDAGraphStep(up)
        graph_steps = {"base": lambda kw: graphed_base(base_x, base_t, **kw), "upsample": lambda kw: graphed_up(up_x, up_t, **kw)}
    steps = {name: finish_step_benchmark(result, device, args.repeats, graph_steps.get(name))
             for name, result in steps.items()}
    print_step_results(list(steps.values()), gemm)
    image_benchmark(args, base, base_options, up, up_options, steps, device)


if __name__ == "__main__":
    main()
