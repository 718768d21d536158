"""Acceptance: fastsplit on real architectures, through the public API only.

Every ``keras.applications`` family that people grow or prune (ResNet, MobileNet, EfficientNet,
DenseNet, ConvNeXt, VGG, Xception, Inception) plus the hand-written blocks of the keras.io examples
(DCGAN generator and discriminator, squeeze-excite, a residual written with ``+`` / ``keras.ops.add``).
For each model:

- ``test_groups``: every Dense/Conv-family producer is in some group of ``fk.coupled_groups``, no group
  is refused for a reason other than "its units reach the model output", and at least the expected
  number of groups is splittable;
- ``test_widen``: after one Adam step, one ``widen`` of every splittable group (``symmetry="none"``;
  a few units per group, every unit where a layer needs uniform copies) keeps the outputs within
  1e-5 relative, the model trains one more step with ``fit``, and ``model.save`` +
  ``keras.models.load_model`` give the same predictions and growth history.

Inputs are the smallest each application accepts (32x32; 71x71 Xception, 75x75 InceptionV3), with 4 classes,
logits out and a batch of 2. The cost is per op and per variable, not per pixel: on a 2-core CPU the module
takes about 4.5 CPU-minutes under TensorFlow (eager steps) and about half that under PyTorch; under JAX, where
XLA compiles every initializer shape and both train steps, an application takes about 3 CPU-minutes, so
there every application is marked slow.
``-m "not slow"`` keeps the hand-written models and the lighter applications.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import fastsplit.keras as fk  # noqa: E402  (registers the grown model classes for load_model)

L = keras.layers
BACKEND = keras.backend.backend()
TOL = 1e-5  # max |after - before| / max |before|, float32
BATCH = 2
CLASSES = 4
#: eager steps are cheapest for one step of a big model on TensorFlow and PyTorch; JAX compiles
#: every op of an eager step separately, so it runs the jitted step.
EAGER = BACKEND != "jax"

#: layers whose output units are split (DepthwiseConv, and Conv with one group per input channel,
#: are per-unit state, not producers)
PRODUCERS = tuple(
    getattr(L, n)
    for n in ("Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
              "SeparableConv1D", "SeparableConv2D")
)


# -- hand-written models (keras.io examples, shrunk) ----------------------------------------------------


def dcgan_generator(latent=16, c=16):
    """The DCGAN generator of the TensorFlow/keras.io examples: Dense -> BN -> LeakyReLU -> Reshape((7, 7, c))
    -> Conv2DTranspose stack with BN -> 28x28x1 (tanh)."""
    return keras.Sequential([
        keras.Input((latent,)),
        L.Dense(7 * 7 * c, use_bias=False, name="g_dense"),
        L.BatchNormalization(name="g_bn0"),
        L.LeakyReLU(0.2),
        L.Reshape((7, 7, c)),
        L.Conv2DTranspose(c, 5, strides=1, padding="same", use_bias=False, name="g_deconv1"),
        L.BatchNormalization(name="g_bn1"),
        L.LeakyReLU(0.2),
        L.Conv2DTranspose(c // 2, 5, strides=2, padding="same", use_bias=False, name="g_deconv2"),
        L.BatchNormalization(name="g_bn2"),
        L.LeakyReLU(0.2),
        L.Conv2DTranspose(1, 5, strides=2, padding="same", use_bias=False, activation="tanh", name="g_out"),
    ], name="generator")


def dcgan_discriminator():
    """The DCGAN discriminator: Conv2D stack with LeakyReLU and Dropout -> Flatten -> Dense(1)."""
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(8, 5, strides=2, padding="same", name="d_conv1"),
        L.LeakyReLU(0.2),
        L.Dropout(0.3),
        L.Conv2D(16, 5, strides=2, padding="same", name="d_conv2"),
        L.LeakyReLU(0.2),
        L.Dropout(0.3),
        L.Flatten(),
        L.Dense(1, name="d_out"),
    ], name="discriminator")


def squeeze_excite(c=8, ratio=4):
    """Conv -> BN -> ReLU, then the classic Keras squeeze-excite block: GlobalAveragePooling2D ->
    Reshape((1, 1, c)) -> Dense(c // ratio, relu) -> Dense(c, sigmoid) -> Multiply with the feature map."""
    inp = keras.Input((8, 8, 3))
    f = L.Conv2D(c, 3, padding="same", name="conv1")(inp)
    f = L.BatchNormalization(name="bn1")(f)
    f = L.ReLU()(f)
    se = L.GlobalAveragePooling2D()(f)
    se = L.Reshape((1, 1, c))(se)
    se = L.Dense(c // ratio, activation="relu", use_bias=False, name="se_reduce")(se)
    se = L.Dense(c, activation="sigmoid", use_bias=False, name="se_expand")(se)
    h = L.Multiply(name="se_mul")([f, se])
    h = L.Conv2D(c, 3, padding="same", activation="relu", name="conv2")(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inp, L.Dense(CLASSES, name="out")(h), name="squeeze_excite")


def residual_operators(c=8):
    """Residual connections written as operators: ``x = x + Conv2D(x)``, ``keras.ops.add(x, branch)``, and
    a vector residual ``v + Dense(v)`` after pooling (all one stream)."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(c, 3, padding="same", name="stem")(inp)
    x = x + L.Conv2D(c, 3, padding="same", activation="relu", name="res_a")(x)
    b = L.Conv2D(2 * c, 1, activation="relu", name="res_b1")(x)
    x = keras.ops.add(x, L.Conv2D(c, 3, padding="same", name="res_b2")(b))
    v = L.GlobalAveragePooling2D()(L.ReLU()(x))
    v = v + L.Dense(c, activation="relu", name="res_dense")(v)
    return keras.Model(inp, L.Dense(CLASSES, name="out")(v), name="residual_operators")


def application(name, size, **kw):
    def build():
        return getattr(keras.applications, name)(
            weights=None, include_top=True, input_shape=(size, size, 3), classes=CLASSES,
            classifier_activation=None, **kw
        )

    build.__name__ = name
    build.application = True
    return build


#: name -> (builder, splittable groups expected once every layer on the way is supported, slow).
#: The counts are read off the architectures; a group is one producer, or every producer of one residual
#: stream or squeeze-excite product; the classifier's group reaches the model output and is not counted.
#: ``slow``: test_widen takes more than 20 CPU-seconds under TensorFlow on a 2-core CPU (measured: 21-49 s;
#: the others 1-17 s).
MODELS = {
    # hand-written
    "dcgan_generator": (dcgan_generator, 3, False),  # g_dense, g_deconv1, g_deconv2
    "dcgan_discriminator": (dcgan_discriminator, 2, False),  # d_conv1, d_conv2
    "squeeze_excite": (squeeze_excite, 3, False),  # {conv1, se_expand}, se_reduce, conv2
    "residual_operators": (residual_operators, 2, False),  # {stem, res_a, res_b2, res_dense}, res_b1
    # keras.applications
    # stem + 4 stage streams + 2 per bottleneck x 16
    "ResNet50": (application("ResNet50", 32), 37, True),
    "ResNet50V2": (application("ResNet50V2", 32), 37, True),
    # stem + 16 expand + 7 streams + Conv_1
    "MobileNetV2": (application("MobileNetV2", 32, alpha=0.35), 25, False),
    # stem (with block 0's SE excite) + 8 expand (each with its SE excite) + 9 SE reduce + block 0 project
    # + 4 streams + conv_1 + conv_2
    "MobileNetV3Small": (application("MobileNetV3Small", 32), 27, False),
    # stem + 15 expand (each with its SE excite) + 16 SE reduce + 7 streams + top_conv
    "EfficientNetB0": (application("EfficientNetB0", 32), 40, True),
    # stem + 20 expand (16 with their SE excite) + 16 SE reduce + 6 streams + top_conv
    "EfficientNetV2B0": (application("EfficientNetV2B0", 32), 44, True),
    # stem + 58 x (conv1, conv2) + 3 transitions (Concatenate embeds, it does not couple)
    "DenseNet121": (application("DenseNet121", 32), 120, True),
    # 4 stage streams (uniform: LayerNormalization) + 18 pointwise_conv_1
    "ConvNeXtTiny": (application("ConvNeXtTiny", 32), 22, True),
    # 13 convs + fc1 + fc2
    "VGG16": (application("VGG16", 32), 15, False),
    # block1 conv1, conv2; blocks 2, 3, 13: sepconv1 + {sepconv2, shortcut conv}; block 4: sepconv1 +
    # {sepconv2, shortcut conv, the 8 middle blocks' sepconv3}; middle blocks: sepconv1, sepconv2; block 14: 2
    "Xception": (application("Xception", 71), 28, False),
    # 94 convs, joined only by Concatenate
    "InceptionV3": (application("InceptionV3", 75), 94, True),
}

#: JAX compiles every initializer shape and every train step (minutes per application on 2 cores):
#: there, every application is slow.
CASES = [
    pytest.param(name, id=name,
                 marks=[pytest.mark.slow] if slow else [pytest.mark.slow_on_jax] if getattr(build, "application", False) else [])
    for name, (build, _, slow) in MODELS.items()
]


# -- helpers ---------------------------------------------------------------------------------------------


def _walk(model, prefix=""):
    """(path, layer) for every layer, nested models included (paths ``outer/inner``)."""
    for layer in model.layers:
        path = prefix + layer.name
        if isinstance(layer, keras.Model):
            yield from _walk(layer, path + "/")
        else:
            yield path, layer


def _is_producer(layer):
    if not isinstance(layer, PRODUCERS):
        return False
    groups = getattr(layer, "groups", 1) or 1
    if groups > 1 and isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
        channels = layer.input.shape[-1 if layer.data_format == "channels_last" else 1]
        return groups != channels  # one group per input channel: depthwise, per-unit state
    return True


def _mentions_output(reason):
    return "model output" in reason.lower()


def _reaches_output(group):
    return any(_mentions_output(r) for r in group.refused)


def _describe(groups):
    return "\n".join(
        f"  producers={g.producers[:4]}{'...' if len(g.producers) > 4 else ''} width={g.width}: "
        + " | ".join(g.refused)
        for g in groups
    )


def _data(model, n=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *model.input_shape[1:])).astype("float32")
    y = rng.standard_normal((n, *model.output_shape[1:])).astype("float32")
    return x, y


def _predict(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype="float32")


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def _plans(groups, rng):
    """One plan per splittable group, on its first producer: every unit where a layer needs uniform
    copies, otherwise 1-2 units."""
    plans = {}
    for g in groups:
        if g.refused:
            continue
        if g.uniform:
            plans[g.producers[0]] = None
        else:
            plans[g.producers[0]] = sorted(rng.choice(g.width, size=min(2, g.width), replace=False).tolist())
    return plans


# -- tests -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _step(what):
    """Name the step of a case in any error it raises."""
    try:
        yield
    except Exception as e:
        e.add_note(f"(while {what})")
        raise


@pytest.fixture(scope="module", params=CASES)
def built(request):
    """(name, model): one model per case, shared by its two tests (test_groups only reads it, then
    test_widen trains and widens it; pytest runs them in that order for each case)."""
    keras.utils.set_random_seed(0)
    return request.param, MODELS[request.param][0]()


def test_groups(built):
    name, model = built
    groups = fk.coupled_groups(model)

    listed = {p for g in groups for p in g.producers}
    listed_names = {p.rsplit("/", 1)[-1] for p in listed}
    missing = [p for p, layer in _walk(model)
               if _is_producer(layer) and p not in listed and layer.name not in listed_names]
    problems = []
    if missing:
        problems.append(f"{len(missing)} producers are in no group: {missing}")
    # A group that reaches the model output can never be split; whatever else is said about it is moot.
    refused = [g for g in groups if g.refused and not _reaches_output(g)]
    if refused:
        problems.append(f"{len(refused)} of {len(groups)} groups are refused for a reason other than the model "
                        f"output:\n{_describe(refused)}")
    splittable = sum(1 for g in groups if not g.refused)
    expected = MODELS[name][1]
    if splittable < expected:
        problems.append(f"{splittable} splittable groups, expected at least {expected}")
    if problems:
        pytest.fail(f"{name}:\n" + "\n".join(problems), pytrace=False)


def test_widen(built, tmp_path):
    name, model = built
    model.compile(keras.optimizers.Adam(1e-3), "mse", run_eagerly=EAGER)
    x, y = _data(model)
    x_eval, _ = _data(model, seed=1)
    with _step("training one step before widen"):
        model.train_on_batch(x, y)
    before = _predict(model, x_eval)
    params_before = model.count_params()

    groups = fk.coupled_groups(model)
    plans = _plans(groups, np.random.default_rng(0))
    assert plans, f"{name}: no splittable group:\n{_describe(groups)}"
    with _step(f"widening {len(plans)} groups"):
        fk.widen(model, plans, symmetry="none")
    with _step("predicting with the widened model"):
        after = _predict(model, x_eval)
    assert after.shape == before.shape
    assert model.count_params() > params_before
    err = _rel(before, after)
    assert err <= TOL, f"{name}: widening {len(plans)} groups changed the outputs by {err:.3g} (relative)"

    with _step("fit after widen"):
        hist = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][-1])
    trained = _predict(model, x_eval)

    path = tmp_path / "m.keras"
    with _step("saving the widened model"):
        model.save(path)
    with _step("loading the widened model"):
        loaded = keras.models.load_model(path)
    assert len(fk.history(loaded)) == len(fk.history(model)) == 1
    err = _rel(trained, _predict(loaded, x_eval))
    assert err <= 1e-6, f"{name}: the reloaded model predicts differently ({err:.3g} relative)"
