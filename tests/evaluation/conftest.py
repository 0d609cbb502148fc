"""The reference implementations of FID and KID, and a random-weight FID Inception.

pytorch-fid, torch-fidelity and clean-fid import torchvision, which tests/conftest.py
makes importable beside the CPU torch.

`fid_reference` builds pytorch-fid's `InceptionV3([3])` (the FID Inception of
`fid_inception_v3`) without its download, re-draws every parameter and BatchNorm running
statistic, and saves the state dict of the underlying Inception3 as pytorch-fid's weights
file is laid out (`fc` and `num_batches_tracked` included).
"""

import importlib

import numpy as np
import pytest
import torch


def import_reference(module: str):
    """Imports a reference module (e.g. "pytorch_fid.inception"); skips if not installed."""
    top = module.split(".")[0]
    pytest.importorskip(top, reason=f"{top} (a test dependency) is not installed")
    return importlib.import_module(module)  # torchvision: see tests/conftest.py


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """He-scaled conv weights; BatchNorm scale ~1, bias, running mean / var near 0 / 1, so
    activations keep their scale through ~40 layers while every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            u = torch.rand(p.shape, generator=gen)
            n = torch.randn(p.shape, generator=gen)
            if name.endswith("conv.weight"):
                p.copy_(n * np.sqrt(2.0 / p[0].numel()))
            elif name.endswith("bn.weight"):
                p.copy_(0.8 + 0.4 * u)
            elif name.endswith("running_var"):
                p.copy_(0.5 + u)
            elif name.endswith(("bn.bias", "running_mean")):
                p.copy_(0.1 * n)
            else:  # fc
                p.copy_(0.01 * n)


@pytest.fixture
def reference():
    """`reference("pytorch_fid.fid_score")`: a reference module, imported (see above)."""
    return import_reference


@pytest.fixture(scope="session")
def fid_reference(tmp_path_factory):
    """(pytorch-fid's InceptionV3([3]) with random weights, path of its .pth state dict)."""
    pf = import_reference("pytorch_fid.inception")
    built = []

    def build(*args, **kwargs):
        built.append(torchvision_inception(*args, **kwargs))
        return built[-1]

    torchvision_inception = pf._inception_v3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pf, "_inception_v3", build)
        # fid_inception_v3 loads the downloaded weights into the patched Inception3: give it
        # its own (the real ones cannot be downloaded here).
        mp.setattr(pf, "load_state_dict_from_url", lambda *a, **k: built[-1].state_dict())
        model = pf.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    inception3 = built[-1].eval()
    _randomize(inception3, seed=0)  # the modules are shared with `model`
    path = tmp_path_factory.mktemp("fid_inception") / "pt_inception-random.pth"
    torch.save(inception3.state_dict(), path)
    return model, path
