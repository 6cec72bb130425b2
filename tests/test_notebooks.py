"""The three notebooks run top to bottom (nbclient) on tiny local weights and show real images.

``GLIDE_NOTEBOOK_WEIGHTS`` points the notebooks at tiny random weights written by
``tests/notebook_scripts/tiny_weights.py``; the base models sample 10 steps, the upsamplers 4
(the options files override the notebooks' "100" / "fast27"). The images are read back
from the PNGs the notebooks display.
"""

import base64
import io
from pathlib import Path
from typing import List

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.notebook_scripts.tiny_weights import tiny_state_dict, write_notebook_weights

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
RESPACING = {"base": "10", "base-inpaint": "10", "upsample": "4", "upsample-inpaint": "4"}
KEPT_ROWS_64 = 20  # the inpaint notebook keeps the top 20 of 64 rows


@pytest.fixture(scope="module")
def notebook_weights(tmp_path_factory) -> Path:
    return write_notebook_weights(tmp_path_factory.mktemp("notebook-weights"), RESPACING)


@pytest.fixture
def run_notebook(notebook_weights, tmp_path, monkeypatch):
    """Execute ``notebooks/<name>`` in a fresh kernel (cwd: an empty folder) and return it."""
    monkeypatch.setenv("GLIDE_NOTEBOOK_WEIGHTS", str(notebook_weights))
    # Any download attempt would land here (and fail offline): the notebooks must not need it.
    monkeypatch.setenv("GLIDE_CACHE_DIR", str(tmp_path / "cache"))
    workdir = tmp_path / "work"
    workdir.mkdir()

    def run(name: str) -> nbformat.NotebookNode:
        notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
        client = NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
        )
        client.execute()
        assert list(workdir.iterdir()) == [], "the notebook must not write files"
        return notebook

    return run


def cell(notebook: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    matches = [c for c in notebook.cells if c.get("id") == cell_id]
    assert len(matches) == 1, f"the notebook has no single cell with id {cell_id!r}"
    return matches[0]


def shown_images(notebook: nbformat.NotebookNode, cell_id: str) -> List[np.ndarray]:
    """The images displayed by cell ``cell_id``, as [H x W x 3] uint8 arrays, in display order."""
    images = []
    for output in cell(notebook, cell_id).outputs:
        if output.output_type == "display_data" and "image/png" in output.data:
            png = base64.b64decode(output.data["image/png"])
            images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    return images


def printed_text(notebook: nbformat.NotebookNode, cell_id: str) -> str:
    return "".join(o.text for o in cell(notebook, cell_id).outputs if o.output_type == "stream" and o.name == "stdout")


def assert_is_picture(image: np.ndarray, size: int) -> None:
    """An RGB uint8 picture of size × size whose pixels vary (not a blank or a single colour)."""
    assert image.shape == (size, size, 3)
    assert image.dtype == np.uint8
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > size, "the image is (nearly) a single colour"
    assert image.std() > 10


def parameter_count(name: str) -> int:
    return sum(t.numel() for t in tiny_state_dict(name).values())


def test_text2im_notebook_generates_64_then_256_image(run_notebook):
    notebook = run_notebook("text2im.ipynb")

    assert f"total base parameters {parameter_count('base')}" in printed_text(notebook, "base-model")
    assert f"total upsampler parameters {parameter_count('upsample')}" in printed_text(notebook, "upsample-model")
    (sample_64,) = shown_images(notebook, "sample-base")
    (sample_256,) = shown_images(notebook, "sample-upsample")
    assert_is_picture(sample_64, 64)
    assert_is_picture(sample_256, 256)


def test_clip_guided_notebook_generates_64_then_256_image(run_notebook):
    notebook = run_notebook("clip_guided.ipynb")

    assert f"total base parameters {parameter_count('base')}" in printed_text(notebook, "base-model")
    (sample_64,) = shown_images(notebook, "sample-base")
    (sample_256,) = shown_images(notebook, "sample-upsample")
    assert_is_picture(sample_64, 64)
    assert_is_picture(sample_256, 256)


def test_inpaint_notebook_keeps_the_unmasked_rows_and_repaints_the_rest(run_notebook):
    notebook = run_notebook("inpaint.ipynb")

    assert f"total base parameters {parameter_count('base-inpaint')}" in printed_text(notebook, "base-model")
    source_64, kept_source_256 = shown_images(notebook, "source")
    (sample_64,) = shown_images(notebook, "sample-base")
    (sample_256,) = shown_images(notebook, "sample-upsample")
    assert_is_picture(source_64, 64)
    assert_is_picture(sample_64, 64)
    assert_is_picture(sample_256, 256)

    kept_256 = KEPT_ROWS_64 * 4
    np.testing.assert_array_equal(sample_64[:KEPT_ROWS_64], source_64[:KEPT_ROWS_64])
    np.testing.assert_array_equal(sample_256[:kept_256], kept_source_256[:kept_256])
    assert np.all(kept_source_256[kept_256:] == 128), "the repainted part is shown grey (0 in [-1, 1])"
    repainted = np.any(sample_64[KEPT_ROWS_64:] != source_64[KEPT_ROWS_64:], axis=-1)
    assert repainted.mean() > 0.5, "the masked part must be generated, not copied from the source"
