"""Framework tensors in, framework tensors out, through DLPack with no host copy."""

import numpy as np
import pytest

from fastsplit import Job, interop, plan, split, split_many

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")
jnp = jax.numpy


def _np(t):
    if isinstance(t, torch.Tensor):
        return t.detach().float().numpy()
    return np.asarray(t, dtype=np.float32)


MAKERS = {
    "torch": lambda a: torch.from_numpy(a.copy()).requires_grad_(True),
    "tensorflow": lambda a: tf.constant(a),
    "tf.Variable": lambda a: tf.Variable(a),
    "jax": lambda a: jnp.asarray(a),
}


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("bf16", [False, True])
def test_tensors_come_back_as_the_same_framework(name, bf16):
    a = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    x = MAKERS[name](a)
    if bf16:
        x = {"torch": lambda t: t.to(torch.bfloat16), "jax": lambda t: t.astype(jnp.bfloat16)}.get(
            name, lambda t: tf.cast(t, tf.bfloat16)
        )(x)
    p = plan(6, [1, 4], symmetry="none")
    y = split(x, p, role="outgoing")
    kind = interop.kind_of(x)
    assert interop.kind_of(y) == kind
    expect = np.asarray(_np(x))[:, p.src] * p.ratio.astype(np.float32)
    np.testing.assert_allclose(_np(y), expect, rtol=1e-2 if bf16 else 1e-6)
    if kind == "torch":
        assert y.dtype == (torch.bfloat16 if bf16 else torch.float32) and not y.requires_grad
    np.testing.assert_array_equal(_np(x), a if not bf16 else _np(x))  # input untouched


def test_export_shares_memory_with_the_framework_tensor():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert interop.export(t).array.__array_interface__["data"][0] == t.data_ptr()
    j = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    assert interop.export(j).array.__array_interface__["data"][0] == j.unsafe_buffer_pointer()
    v = tf.Variable(np.ones((3, 4), np.float32))
    n1 = interop.export(v).array
    assert n1.shape == (3, 4) and n1.dtype == np.float32


def test_results_are_imported_without_a_copy():
    t = torch.ones(4, 6)
    y = split(t, plan(6, [0], symmetry="none"))
    # the torch result owns memory that numpy can see without copying
    assert np.from_dlpack(y).__array_interface__["data"][0] == y.data_ptr()


def test_out_may_be_a_torch_tensor_and_jax_out_is_refused():
    x = torch.ones(3, 4)
    out = torch.full((3, 8), float("nan"))
    got = split(x, plan(4, symmetry="none"), role="outgoing", out=out)
    assert got is out and torch.all(out == 0.5)
    with pytest.raises(ValueError, match="immutable"):
        split(np.ones((3, 4), np.float32), plan(4), out=jnp.zeros((3, 8)))


def test_a_batch_of_torch_tensors():
    rng = np.random.default_rng(1)
    p = plan(7)
    jobs = [Job(torch.from_numpy(rng.standard_normal((3, 7)).astype(np.float32)), p) for _ in range(5)]
    for job, y in zip(jobs, split_many(jobs)):
        np.testing.assert_array_equal(y.numpy(), job.x.numpy()[:, p.src])


def test_unknown_objects_are_refused():
    with pytest.raises(ValueError, match="cannot split an object of type builtins.list"):
        split([[1.0, 2.0]], plan(2))
