"""Per-prompt sampling runs stepped together, with their network calls batched.

Every prompt of a pipeline call is sampled by its own *stream*: a thread running the plain
notebook procedure for that prompt alone, drawing every random number from the prompt's own
``torch.Generator``. Calls that streams make through a :class:`Rendezvous` wait until every
running stream has made its call; the calls are then combined into one (for the U-Net: one
forward pass over all streams' rows) and each stream continues with its share of the result.

So a prompt's images depend only on its own seed, whatever else is in the batch (up to the
rounding of batched kernels), while the network still sees one large batch per step. All
streams of a group must make the same sequence of rendezvous calls, which holds when they run
the same sampler with the same settings.
"""

import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch

T = TypeVar("T")

_current = threading.local()


class StreamAborted(Exception):
    """Raised in a stream when another stream of its group failed."""


class NonFiniteOutputError(FloatingPointError):
    """The network produced NaN or infinite values."""


class StreamGroup:
    """Runs ``fn(k)`` for k = 0 .. num_streams - 1, one thread each; see the module docstring."""

    def __init__(self, num_streams: int):
        if num_streams < 1:
            raise ValueError(f"num_streams must be at least 1, got {num_streams}")
        self.num_streams = num_streams
        self._condition = threading.Condition()
        self._active = set(range(num_streams))
        self._rendezvous: List["Rendezvous"] = []
        self._error: Optional[BaseException] = None

    def rendezvous(self, combine: Callable[[List[Any]], List[Any]]) -> "Rendezvous":
        """A meeting point: ``combine(payloads)`` maps the streams' payloads (in stream order) to their results."""
        point = Rendezvous(self, combine)
        self._rendezvous.append(point)
        return point

    def run(self, fn: Callable[[int], T]) -> List[T]:
        """Run every stream to the end and return their results; re-raises the first failure."""
        results: List[Any] = [None] * self.num_streams
        threads = [
            threading.Thread(target=self._stream_main, args=(k, fn, results), name=f"glide-stream-{k}", daemon=True)
            for k in range(self.num_streams)
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except BaseException as exc:  # e.g. KeyboardInterrupt: stop the streams at their next meeting
            self._fail(exc)
            raise
        if self._error is not None:
            raise self._error
        return results

    def _stream_main(self, k: int, fn: Callable[[int], Any], results: List[Any]) -> None:
        _current.stream = (self, k)
        try:
            results[k] = fn(k)
        except StreamAborted:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._leave(k)
            _current.stream = None

    def _fail(self, exc: BaseException) -> None:
        with self._condition:
            if self._error is None:
                self._error = exc
            self._condition.notify_all()

    def _leave(self, k: int) -> None:
        """Stream k is done: meetings that only waited for it can go ahead."""
        with self._condition:
            self._active.discard(k)
            for point in self._rendezvous:
                if self._error is None and point._ready():
                    try:
                        point._fire()
                    except BaseException:
                        pass  # recorded by _fire; the waiting streams see it


class Rendezvous:
    """A meeting point of a :class:`StreamGroup`; call it with a payload from inside a stream.

    Called from outside any stream of its group it simply runs ``combine([payload])``.
    """

    def __init__(self, group: StreamGroup, combine: Callable[[List[Any]], List[Any]]):
        self._group = group
        self._combine = combine
        self._pending: Dict[int, Any] = {}
        self._results: Dict[int, Any] = {}
        self._round = 0

    def __call__(self, payload: Any) -> Any:
        current = getattr(_current, "stream", None)
        if current is None or current[0] is not self._group:
            return self._combine([payload])[0]
        k = current[1]
        group = self._group
        with group._condition:
            if group._error is not None:
                raise StreamAborted()
            self._pending[k] = payload
            meeting = self._round
            if self._ready():
                self._fire()
            else:
                while self._round == meeting and group._error is None:
                    group._condition.wait()
            if self._round == meeting:
                raise StreamAborted()
            return self._results.pop(k)

    def _ready(self) -> bool:
        return bool(self._pending) and set(self._pending) == self._group._active

    def _fire(self) -> None:
        """Combine the pending calls (the caller holds the group's lock) and wake their streams."""
        order = sorted(self._pending)
        try:
            results = self._combine([self._pending[k] for k in order])
        except BaseException as exc:
            self._group._error = self._group._error or exc
            self._group._condition.notify_all()
            raise
        self._results.update(zip(order, results))
        self._pending.clear()
        self._round += 1
        self._group._condition.notify_all()


class BatchedModel:
    """``model(x, t, **kwargs)`` for the streams of a group: one forward pass over all their rows.

    Each stream's rows are concatenated in stream order (the model kwargs once per set of
    tensors, so a U-Net's text-embedding cache keeps working) and the output is split back.
    Non-finite outputs raise :class:`NonFiniteOutputError` with advice on the precision.
    """

    def __init__(self, model: Callable[..., torch.Tensor], group: StreamGroup, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype
        self._rendezvous = group.rendezvous(self._forward_all)
        self._kwargs_cache: Optional[Tuple[List[Dict[str, Any]], Dict[str, Any]]] = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        return self._rendezvous((x, t, model_kwargs))

    def _forward_all(self, calls: List[Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]]) -> List[torch.Tensor]:
        x = torch.cat([call[0] for call in calls])
        t = torch.cat([call[1] for call in calls])
        out = self.model(x, t, **self._concat_kwargs([call[2] for call in calls]))
        if not torch.isfinite(out).all():
            raise NonFiniteOutputError(non_finite_message(self.dtype))
        return list(out.split([len(call[0]) for call in calls]))

    def _concat_kwargs(self, kwargs_list: List[Dict[str, Any]]) -> Dict[str, Any]:
        if self._kwargs_cache is not None and _same_tensors(self._kwargs_cache[0], kwargs_list):
            return self._kwargs_cache[1]
        keys = kwargs_list[0].keys()
        if any(kwargs.keys() != keys for kwargs in kwargs_list):
            raise ValueError("all streams must pass the same model kwargs")
        combined = {key: torch.cat([kwargs[key] for kwargs in kwargs_list]) for key in keys}
        self._kwargs_cache = (kwargs_list, combined)
        return combined


def _same_tensors(a: Sequence[Dict[str, Any]], b: Sequence[Dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[key] is y[key] for key in x) for x, y in zip(a, b)
    )


def non_finite_message(dtype: torch.dtype) -> str:
    """The error text for NaN / inf outputs of a model running in ``dtype``."""
    name = str(dtype).replace("torch.", "")
    if dtype == torch.float16:
        return (
            "the model produced NaN or infinite values in float16 (half precision overflows on some GPUs): "
            "run it in float32 or bfloat16 instead (dtype='float32' or 'bfloat16'; --dtype on the command line)"
        )
    if dtype == torch.bfloat16:
        return "the model produced NaN or infinite values in bfloat16: run it in float32 instead (dtype='float32')"
    return f"the model produced NaN or infinite values in {name}: check the checkpoint and its options"
