"""Test setup: on a machine without a GPU the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET is read when kernels are decorated, so it is set here, before any test
imports ds_kernels' kernel modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Interpreted kernels cost ~5 ms per program step: property tests keep example counts small
# and take no deadline (the first call of a kernel also pays for its parse). The backend
# fixture only holds a use_backend() context, which is the same for every example.
settings.register_profile("ci", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("ci")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def deterministic_rng(request):
    """Plain tests start from one fixed global seed. Property tests may not touch the global
    RNG at all: hypothesis replays a failing example on its own, so each random tensor must come
    from the drawn example (a drawn seed into a local ``torch.Generator``)."""
    property_test = getattr(request.function, "is_hypothesis_test", False)
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        before = _rng_states(devices)
        yield
        after = _rng_states(devices)
    if property_test and any(not torch.equal(b, a) for b, a in zip(before, after)):
        pytest.fail(f"{request.node.nodeid} drew from the global torch RNG inside a property "
                    "test; draw a seed and use a local torch.Generator", pytrace=False)


def _rng_states(devices):
    return [torch.random.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in devices]
# Every op's non-reference backends that can run here; each is checked against the reference.
FAST_BACKENDS = ["torch", "triton"]


def backend_fixture(*torch_strategies):
    """A ``backend`` fixture over FAST_BACKENDS, with the torch path once per strategy
    ("torch:<strategy>") for ops whose CPU path has several (see ds_kernels/tuning.py)."""
    params = [f"torch:{s}" for s in torch_strategies] or ["torch"]
    params += [b for b in FAST_BACKENDS if b != "torch"]

    @pytest.fixture(params=params)
    def backend(request):
        import ds_kernels
        from ds_kernels import tuning

        name, _, strategy = request.param.partition(":")
        forced = {"strategy": strategy} if strategy else {}
        with ds_kernels.use_backend(name), tuning.override(**forced):
            yield request.param

    return backend


backend = backend_fixture()
