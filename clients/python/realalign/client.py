"""Small typed helpers over the generated realalign.v1 stubs.

Tensors travel as (dtype name, shape, raw little-endian row-major bytes); see protos/realalign/v1/common.proto.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import grpc
import numpy as np

from .v1 import common_pb2, generation_pb2, generation_pb2_grpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

_NUMPY_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}


def tensor_to_numpy(t: common_pb2.Tensor) -> np.ndarray:
    """A proto Tensor as a numpy array (bfloat16 is widened to float32: numpy has no bfloat16)."""
    shape = tuple(int(d) for d in t.shape)
    if t.dtype == "bfloat16":
        raw = np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    if t.dtype not in _NUMPY_DTYPES:
        raise ValueError(f"unknown tensor dtype {t.dtype!r}")
    return np.frombuffer(t.data, dtype=_NUMPY_DTYPES[t.dtype]).reshape(shape).copy()


def numpy_to_tensor(a: np.ndarray, dtype: Optional[str] = None) -> common_pb2.Tensor:
    """A numpy array as a proto Tensor; dtype defaults to the array's own (float64 becomes float32)."""
    a = np.asarray(a)
    if dtype is None:
        dtype = "float32" if a.dtype == np.float64 else next(
            (name for name, dt in _NUMPY_DTYPES.items() if dt == a.dtype.newbyteorder("<") or dt == a.dtype), None)
        if dtype is None:
            raise ValueError(f"no wire dtype for numpy dtype {a.dtype}")
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        data = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()  # round to nearest even
    else:
        data = np.ascontiguousarray(a, dtype=_NUMPY_DTYPES[dtype]).tobytes()
    return common_pb2.Tensor(dtype=dtype, shape=list(a.shape), data=data)


@dataclass
class Sample:
    index: int
    seed: int
    png: Optional[bytes]
    prior_noise: np.ndarray
    image: Optional[np.ndarray] = None
    latents: Optional[np.ndarray] = None


class RealAlignClient:
    """Talks to a RealAlign server over HTTP/2 cleartext, e.g. RealAlignClient("127.0.0.1:50051")."""

    def __init__(self, target: str = "127.0.0.1:50051"):
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RealAlignClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def list_backbones(self):
        return list(self.generation.ListBackbones(generation_pb2.ListBackbonesRequest()).backbones)

    def generate(
        self,
        prompt: str,
        backbone: str = "tiny-sd3",
        *,
        negative_prompt: str = "",
        width: int = 0,
        height: int = 0,
        steps: int = 0,
        guidance_scale: float = 7.0,
        num_images: int = 1,
        seeds: Optional[Sequence[int]] = None,
        prior_noise: Optional[Sequence[np.ndarray]] = None,
        return_image_tensor: bool = False,
        return_latents: bool = False,
        omit_png: bool = False,
        on_progress: Optional[Callable[[generation_pb2.Progress], None]] = None,
        timeout: Optional[float] = None,
    ) -> list[Sample]:
        """Runs one request to the end; samples come back in index order."""
        request = generation_pb2.GenerateRequest(
            backbone=backbone, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
            num_inference_steps=steps, guidance_scale=guidance_scale, num_images=num_images,
            seeds=list(seeds or []), prior_noise=[numpy_to_tensor(n, "float32") for n in (prior_noise or [])],
            return_image_tensor=return_image_tensor, return_latents=return_latents, omit_png=omit_png)
        samples = []
        for event in self.generation.Generate(request, timeout=timeout):
            kind = event.WhichOneof("event")
            if kind == "progress":
                if on_progress:
                    on_progress(event.progress)
            elif kind == "image":
                img = event.image
                samples.append(Sample(
                    index=img.index,
                    seed=img.seed,
                    png=img.image_png or None,
                    prior_noise=tensor_to_numpy(img.prior_noise),
                    image=tensor_to_numpy(img.image) if img.HasField("image") else None,
                    latents=tensor_to_numpy(img.latents) if img.HasField("latents") else None,
                ))
        return sorted(samples, key=lambda s: s.index)


def generate(target: str, prompt: str, **kwargs) -> list[tuple[Optional[bytes], np.ndarray, int]]:
    """One-shot helper: [(png bytes, prior noise x_T as float32 [C, H/f, W/f], seed)] per sample."""
    with RealAlignClient(target) as client:
        return [(s.png, s.prior_noise, s.seed) for s in client.generate(prompt, **kwargs)]
