"""The FID Inception v3: pool3 features of the TensorFlow graph `inception-2015-12-05`.

Every published FID is computed with this network (Heusel et al. 2017, "GANs Trained by a
Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"; the TF graph of the
original `fid.py`). The architecture here is pytorch-fid's port of it (mseitzer/pytorch-fid,
`pytorch_fid/inception.py`: torchvision's Inception3 with the blocks `FIDInceptionA`,
`FIDInceptionC`, `FIDInceptionE_1`, `FIDInceptionE_2`), in NHWC:

* the average pools of the A, C and E_1 blocks leave the zero padding out of the mean
  (TensorFlow's `count_include_pad=False`);
* the last block (E_2) max-pools where torchvision average-pools;
* BatchNorm eps 1e-3; the output is the 2048-dim global average pool ("pool3").

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a PyTorch state dict of
torchvision's Inception3 layout, read with `torch.load(weights_only=True)` when torch is
installed), or a safetensors file of the same tensors (`convert` writes one):

    python tools/convert_inception.py --convert=pt_inception-2015-12-05-6726825d.pth \
        --out=fid_inception.safetensors

Resizing to 299 moves FID, so it is chosen by name and recorded (`RESIZE_MODES`):

* "pytorch_fid": pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`:
  uint8 / 255, bilinear resize (`F.interpolate(align_corners=False)`, no antialiasing),
  then 2x - 1. Runs on the accelerator.
* "clean_fid": clean-fid's "clean" mode (Parmar et al. 2022, "On Aliased Resizing and
  Surprising Subtleties in GAN Evaluation"): each channel of the uint8 image resized as
  float32 by PIL's bicubic filter, clipped to [0, 255], not re-quantized; then clean-fid's
  normalization (x - 128) / 128 (its `InceptionV3W`). Resized on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals
from jax import lax
from PIL import Image

from imagen_jax import parallel
from imagen_jax.weights import CheckpointError, Source, load_into, read_safetensors_header

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
RESIZE_MODES = ("pytorch_fid", "clean_fid")
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release asset
# In the checkpoint but not used for pool3 features: the 1008-way classifier, BN counters.
UNUSED = (r"fc\.(weight|bias)", r".*\.num_batches_tracked")
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class Conv2d(nnx.Module):
    """A bias-free convolution whose kernel keeps PyTorch's layout [out, in, kh, kw], so that
    checkpoint tensors load unchanged and errors name their shapes as the file has them."""

    def __init__(self, in_ch, out_ch, kernel, *, stride=1, padding=0, rngs, dtype, param_dtype):
        kh, kw = _pair(kernel)
        init = nnx.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0)
        self.weight = nnx.Param(init(rngs.params(), (out_ch, in_ch, kh, kw), param_dtype))
        self.stride = _pair(stride)
        self.padding = tuple((p, p) for p in _pair(padding))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, in] -> [B, H', W', out]
        return lax.conv_general_dilated(
            x.astype(self.dtype),
            self.weight[...].astype(self.dtype),
            window_strides=self.stride,
            padding=self.padding,
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
            # TF32 (the GPU default for float32) would move features by ~1e-3.
            precision=lax.Precision.HIGHEST,
        )


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3, running stats) -> ReLU."""

    def __init__(self, in_ch, out_ch, kernel, *, stride=1, padding=0, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv = Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, **kw)
        self.bn = nnx.BatchNorm(out_ch, use_running_average=True, epsilon=BN_EPS, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool, NHWC; padded positions never win (torch's max_pool2d)."""
    pad = ((padding, padding), (padding, padding))
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


def avg_pool_tf(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool over the valid positions only (count_include_pad=False),
    as TensorFlow's graph does; torchvision's Inception counts the zero padding."""
    return nnx.avg_pool(
        x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False
    )


class FIDInceptionA(nnx.Module):
    def __init__(self, in_ch: int, pool_features: int, **kw):
        self.branch1x1 = BasicConv2d(in_ch, 64, 1, **kw)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1, **kw)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1, **kw)

    def __call__(self, x):  # [B, H, W, in] -> [B, H, W, 224 + pool_features]
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_tf(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, in_ch: int, **kw):
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

    def __call__(self, x):  # [B, H, W, in] -> [B, (H-3)//2+1, (W-3)//2+1, 480 + in]
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
    def __init__(self, in_ch: int, channels_7x7: int, **kw):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1, **kw)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1, **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv2d(in_ch, 192, 1, **kw)

    def __call__(self, x):  # [B, H, W, 768] -> [B, H, W, 768]
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            bd = conv(bd)
        bd = self.branch7x7dbl_5(bd)
        bp = self.branch_pool(avg_pool_tf(x))
        return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, in_ch: int, **kw):
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1, **kw)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

    def __call__(self, x):  # [B, H, W, 768] -> [B, (H-3)//2+1, (W-3)//2+1, 1280]
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
    """`FIDInceptionE_1` (pool="avg", Mixed_7b) or `FIDInceptionE_2` (pool="max", Mixed_7c:
    the TF graph max-pools here, likely by mistake, and every FID since has kept it)."""

    def __init__(self, in_ch: int, *, pool: str, **kw):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1, **kw)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1, **kw)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv2d(in_ch, 192, 1, **kw)

    def __call__(self, x):  # [B, H, W, in] -> [B, H, W, 2048]
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = avg_pool_tf(x) if self.pool == "avg" else max_pool(x, 1, padding=1)
        return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """The FID Inception v3 up to pool3 (pytorch-fid's `InceptionV3([3])` without its resize
    and normalization, which `preprocess` does). Attribute names are torchvision's, so that
    the state path ("Mixed_5b", "branch1x1", "conv", "weight") is the checkpoint's
    "Mixed_5b.branch1x1.conv.weight"."""

    def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = FIDInceptionA(192, 32, **kw)
        self.Mixed_5c = FIDInceptionA(256, 64, **kw)
        self.Mixed_5d = FIDInceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = FIDInceptionC(768, 128, **kw)
        self.Mixed_6c = FIDInceptionC(768, 160, **kw)
        self.Mixed_6d = FIDInceptionC(768, 160, **kw)
        self.Mixed_6e = FIDInceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg", **kw)
        self.Mixed_7c = FIDInceptionE(2048, pool="max", **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, 3] in [-1, 1] (299x299 for standard features) -> pool3 [B, 2048]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 147, 147, 64]
        x = max_pool(x, 2)  # [B, 73, 73, 64]
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)  # [B, 35, 35, 192]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)  # [B, 17, 17, 768] after Mixed_6a
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [B, 8, 8, 2048]
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Array:
    """An in-memory tensor with the interface of `weights.TensorInfo` (shape, read)."""

    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def read(self) -> np.ndarray:
        return self.array


class _Tensors(dict):
    """name -> tensor, with the file's path for error messages."""

    def __init__(self, path: str, tensors: Mapping):
        super().__init__(tensors)
        self.path = path


def read_weights(path: str | os.PathLike) -> Mapping:
    """The tensors of a weights file by name: safetensors (by extension), else a PyTorch state
    dict read with `torch.load(weights_only=True)` (which never unpickles arbitrary objects)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights file {path!r} does not exist: pass pytorch-fid's {WEIGHTS_FILE} "
            "(published with pytorch-fid's GitHub releases, tag fid_weights; download it "
            "yourself) or a safetensors file converted from it (python "
            "tools/convert_inception.py --convert=IN.pth --out=OUT.safetensors)"
        )
    if path.endswith(".safetensors"):
        return _Tensors(path, read_safetensors_header(path))
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is not .safetensors and torch, needed to read a PyTorch state dict, is not "
            "installed: convert it to safetensors where torch is (tools/convert_inception.py)"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for files that are not state dicts
        raise CheckpointError(f"{path}: not a PyTorch state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state)}")
    return _Tensors(path, {k: _Array(v.detach().cpu().numpy()) for k, v in state.items()})


def key_map(abstract: InceptionV3) -> dict[tuple, Source]:
    """Our state paths -> the checkpoint's names: the path joined by dots, with BatchNorm's
    scale / bias / mean / var as PyTorch's weight / bias / running_mean / running_var."""
    paths = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(abstract)))
    out = {}
    for path in paths:
        *module, leaf = map(str, path)
        if module and module[-1] == "bn":
            leaf = _BN_NAMES[leaf]
        out[path] = Source.of(".".join([*module, leaf]))
    return out


def load_inception(path: str | os.PathLike, *, dtype=jnp.float32) -> InceptionV3:
    """The FID Inception with the weights of `path` (see `read_weights`).

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: naming every missing, unexpected and mis-shaped tensor.
    """
    tensors = read_weights(path)
    abstract = nnx.merge(*_abstract_parts(dtype))
    return load_into(abstract, key_map(abstract), tensors, unused=UNUSED, what="FID Inception v3")


@functools.cache
def _abstract_parts(dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """The split abstract network, traced once per dtype (tracing its 94 initializers takes
    seconds; loading leaves the cached state abstract)."""
    return nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), dtype=dtype)))


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file (pytorch-fid's weights file names its first 8 digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(src: str | os.PathLike, out: str | os.PathLike) -> None:
    """Writes the tensors of a PyTorch state dict `src` to the safetensors file `out`, after
    checking (by loading) that they fit the FID Inception."""
    from safetensors.numpy import save_file

    load_inception(src)
    tensors = read_weights(src)
    save_file({k: np.ascontiguousarray(v.read()) for k, v in tensors.items()}, os.fspath(out))


# ----------------------------------------------------------------------------------------------
# Resizing and feature extraction
# ----------------------------------------------------------------------------------------------


def check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return resize


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return image


def clean_fid_resize(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize of one uint8 image [H, W, 3] -> float32 [size, size, 3] in
    [0, 255]: PIL bicubic per channel on float32 ("F" mode), clipped, not re-quantized."""
    image = check_image(image)
    channels = [
        np.asarray(
            Image.fromarray(image[..., c].astype(np.float32)).resize(  # mode "F"
                (size, size), resample=Image.BICUBIC
            )
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.float32)


def torch_bilinear_resize(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C] as `F.interpolate(mode="bilinear",
    align_corners=False)`: half-pixel centres, two taps, no antialiasing when shrinking."""
    if x.shape[1:3] == (size, size):
        return x
    shape = (x.shape[0], size, size, x.shape[3])
    return jax.image.resize(x, shape, method="linear", antialias=False)


def normalize(x: jax.Array, resize: str) -> jax.Array:
    """The network's input in [-1, 1] from a batch prepared by `prepare_batch`.

    pytorch_fid: uint8 [B, H, W, 3] -> /255 -> bilinear to 299 -> 2x - 1.
    clean_fid: float32 [B, 299, 299, 3] in [0, 255] (already resized) -> (x - 128) / 128.
    """
    if check_resize(resize) == "pytorch_fid":
        x = torch_bilinear_resize(x.astype(jnp.float32) / 255.0)
        return 2.0 * x - 1.0
    return (x.astype(jnp.float32) - 128.0) / 128.0


def prepare_image(image: np.ndarray, resize: str) -> np.ndarray:
    """One image as the host sends it: uint8 [H, W, 3] (pytorch_fid), float32 [299, 299, 3]
    (clean_fid)."""
    image = check_image(image)
    return image if check_resize(resize) == "pytorch_fid" else clean_fid_resize(image)


@jax.jit(static_argnames=("graphdef", "resize"))
def _features(graphdef, state, x, resize):
    return nnx.merge(graphdef, state)(normalize(x, resize))


class FeatureExtractor:
    """Pool3 features of images, batch after batch of a fixed size, each batch sharded over
    the local devices (a 1-D "data" mesh); the last batch is padded.

        extractor = FeatureExtractor(load_inception(path), resize="pytorch_fid")
        features = extractor(images)  # iterable of uint8 [H, W, 3] -> float32 [N, 2048]

    The batch size is rounded up to a multiple of the device count. In "pytorch_fid" mode
    each image size compiles its own program (the resize runs inside it); a batch holds
    images of one size.
    """

    def __init__(
        self,
        model: InceptionV3,
        *,
        resize: str = "pytorch_fid",
        batch_size: int = 50,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.resize = check_resize(resize)
        devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = parallel.make_mesh([("data", -1)], devices=devices)
        n = len(devices)
        self.batch_size = -(-max(int(batch_size), 1) // n) * n
        self.graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, parallel.replicated(self.mesh))
        self._batch_sharding = parallel.batch_sharding(self.mesh)

    def _run(self, batch: list[np.ndarray]) -> np.ndarray:
        real = len(batch)
        x = np.stack(batch)
        if real < self.batch_size:
            pad = np.zeros((self.batch_size - real, *x.shape[1:]), x.dtype)
            x = np.concatenate([x, pad])
        x = jax.device_put(x, self._batch_sharding)
        out = _features(self.graphdef, self.state, x, resize=self.resize)  # [batch, 2048]
        return np.asarray(out)[:real]

    def batches(self, images: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Features [b, 2048] float32, batch by batch, in the order of `images`."""
        pending: list[np.ndarray] = []
        for i, image in enumerate(images):
            x = prepare_image(check_image(image, f"image {i}"), self.resize)  # [H, W, 3]
            if pending and (x.shape != pending[0].shape or len(pending) == self.batch_size):
                yield self._run(pending)
                pending = []
            pending.append(x)
        if pending:
            yield self._run(pending)

    def __call__(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """Features [N, 2048] float32 of the N images (uint8 [H, W, 3] each)."""
        out = list(self.batches(images))
        if not out:
            raise ValueError("no images to extract features from")
        return np.concatenate(out)
