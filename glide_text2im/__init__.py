"""GLIDE (filtered) text-to-image diffusion: checkpoint-compatible models, samplers and pipelines."""

__version__ = "0.2.0"

# Re-exported from glide_text2im.pipelines on first access, so `import glide_text2im` stays light.
_PIPELINE_EXPORTS = (
    "CLIPGuidedPipeline",
    "InpaintPipeline",
    "PipelineOutput",
    "Text2ImPipeline",
)


def __getattr__(name: str):
    if name in _PIPELINE_EXPORTS:
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PIPELINE_EXPORTS])
