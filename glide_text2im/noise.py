"""Normal noise for a batch whose rows belong to different random streams.

A pipeline samples several prompts in one batch, yet each prompt's images must depend only on
its own seed: a batch of prompts gives the images that running the prompts one by one with
the same seeds gives. :class:`GroupedNoise` makes that hold by drawing every noise tensor
group by group, each group of rows from its own ``torch.Generator``, in exactly the calls a
one-prompt run makes with that generator.

The sampling loops (``GaussianDiffusion.p_sample_loop`` and friends, the samplers of
``glide_text2im.samplers``) take such a noise source wherever they take ``generator=``.
"""

from typing import Dict, List, Optional, Protocol, Sequence, Union

import torch


class NoiseSource(Protocol):
    """Anything that draws standard normal noise of a given shape, like ``torch.randn``."""

    def randn(self, shape: Sequence[int], device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        ...


# What the sampling loops accept as ``generator``: None is the global RNG.
NoiseGenerator = Union[torch.Generator, NoiseSource]


def randn(
    shape: Sequence[int],
    generator: Optional[NoiseGenerator],
    device: Union[torch.device, str],
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``torch.randn(shape)`` on ``device`` drawn from ``generator``: a torch.Generator, a noise
    source such as :class:`GroupedNoise`, or None for the global RNG."""
    shape = tuple(int(s) for s in shape)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return generator.randn(shape, torch.device(device), dtype)


class GroupedNoise:
    """Standard normal noise for a batch whose groups of rows each have their own generator.

    A draw of shape [N x ...] takes, for every group g in turn,
    ``torch.randn((len(rows[g]),) + shape[1:], generator=generators[g])`` and puts its j-th
    row at batch row ``rows[g][j]``. So with one group covering rows 0 .. N-1 in order it is
    ``torch.randn(shape, generator=generators[0])`` exactly.

    :param generators: one ``torch.Generator`` per group, on the device the noise is drawn on.
    :param rows: for each generator, the batch rows its draws fill, in draw order; the groups
        together cover rows 0 .. N-1, each once.
    """

    def __init__(self, generators: Sequence[torch.Generator], rows: Sequence[Sequence[int]]):
        generators, rows = list(generators), [[int(r) for r in group] for group in rows]
        if len(generators) != len(rows):
            raise ValueError(f"pass one list of rows per generator: got {len(rows)} for {len(generators)} generators")
        for g in generators:
            if not isinstance(g, torch.Generator):
                raise TypeError(f"generators must be torch.Generator objects, got {type(g).__name__}")
        order = [r for group in rows for r in group]
        if sorted(order) != list(range(len(order))):
            raise ValueError(f"the rows of the groups must cover rows 0 .. N-1 once each, got {rows}")
        self.generators = generators
        self.rows = rows
        self.batch_size = len(order)
        # drawn[m] goes to batch row order[m], so batch row r is drawn[inverse[r]]
        self._inverse: Optional[List[int]] = None
        if order != list(range(self.batch_size)):
            self._inverse = sorted(range(self.batch_size), key=order.__getitem__)
        self._inverse_on: Dict[torch.device, torch.Tensor] = {}

    @classmethod
    def for_prompts(
        cls, generators: Sequence[torch.Generator], rows_per_prompt: int, classifier_free: bool = False
    ) -> "GroupedNoise":
        """The pipelines' layouts, prompt i drawing from ``generators[i]`` with k = ``rows_per_prompt``.

        Without guidance the batch is [rows of prompt 0 (k), rows of prompt 1 (k), ...]. With
        classifier-free guidance it is [cond rows of prompts 0 .. P-1 (k each), uncond rows of
        prompts 0 .. P-1 (k each)], and prompt i's draw of 2k rows fills its k cond rows and then
        its k uncond rows, as its one-prompt batch [cond (k), uncond (k)] would be filled.
        """
        k, num_prompts = rows_per_prompt, len(generators)
        if classifier_free:
            half = num_prompts * k
            rows = [[*range(i * k, (i + 1) * k), *range(half + i * k, half + (i + 1) * k)] for i in range(num_prompts)]
        else:
            rows = [list(range(i * k, (i + 1) * k)) for i in range(num_prompts)]
        return cls(generators, rows)

    def randn(self, shape: Sequence[int], device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Noise [N x ...] on ``device`` (``dtype`` defaults to torch's default float type)."""
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != self.batch_size:
            raise ValueError(f"this noise source draws batches of {self.batch_size} rows, got shape {shape}")
        draws = [
            torch.randn((len(rows),) + shape[1:], generator=g, device=device, dtype=dtype)
            for g, rows in zip(self.generators, self.rows)
        ]
        drawn = draws[0] if len(draws) == 1 else torch.cat(draws)
        if self._inverse is None:
            return drawn
        return drawn.index_select(0, self._inverse_index(drawn.device))

    def _inverse_index(self, device: torch.device) -> torch.Tensor:
        """The inverse permutation as an index tensor, copied to each device once."""
        if device not in self._inverse_on:
            self._inverse_on[device] = torch.tensor(self._inverse, dtype=torch.long, device=device)
        return self._inverse_on[device]
