"""The embedded demo: a procedural captioned dataset of coloured shapes (``shapes``), a pixel
judge (``judge``), and the training that made the small GLIDE model family shipped in
``demo/weights`` (``train``; ``python -m glide_text2im.demo.train`` retrains them all).

The shipped checkpoints themselves (their names, files and options) are
``glide_text2im.bundled``, which ``glide_text2im.download`` reads; its names are re-exported
here, so ``glide_text2im.demo.options("demo/base")`` and the rest keep working. The demo
CLIP's captions use ``glide_text2im.tokenizer.byte.ByteCLIPTokenizer``.
"""

from glide_text2im.bundled import (  # noqa: F401  (re-exported)
    CHECKPOINT_FILES,
    DEMO_EQUIVALENTS,
    UNET_CHECKPOINTS,
    WEIGHTS_DIR,
    clip_config_path,
    demo_equivalent,
    options,
    weights_path,
)
