"""experiments.runs.models: every model × fitting dataset trains a step with the right output
shape; unfit combinations raise; the hand-written GRU and attention agree with PyTorch's
own modules; double backward (Hessian-vector products) works."""

import pytest
import torch
import torch.nn.functional as F

from experiments.runs.data import KINDS, DataInfo, load_data
from experiments.runs.models import FITS, MODELS, Attention, GRULayer, build_model, check_fit
from experiments.runs.loop import make_loss_fn

OFFLINE = ["mnist1d", "digits", "pytext", "linreg"]
SMALL = {"seed-cnn": {"channels": 4, "hidden": 16}, "mlp": {"hidden": [8]}, "resnet": {"width": 4},
         "gru": {"hidden": 8, "embed": 4}, "transformer": {"dim": 8, "layers": 1, "heads": 2}, "linear": {}}


def fits(model, data):
    task, ndim = KINDS[data]
    return task in FITS[model] and (FITS[model][task] is None or ndim in FITS[model][task])


@pytest.mark.parametrize("data", OFFLINE)
@pytest.mark.parametrize("model", list(MODELS))
def test_model_dataset_forward_backward(model, data):
    d = load_data(data)
    if not fits(model, data):
        with pytest.raises(ValueError, match=f"model={model!r} does not fit data={data!r}"):
            build_model(model, d.info, **SMALL[model])
        return
    torch.manual_seed(0)
    net = build_model(model, d.info, **SMALL[model])
    x, y = d.x_train[:5], d.y_train[:5]
    out = net(x)
    expected = {"classify": (5, d.info.n_classes), "lm": (5, d.info.input_shape[0], d.info.vocab_size),
                "regress": (5,)}[d.info.task]
    assert tuple(out.shape) == expected
    loss = make_loss_fn(d.info.task)(net, (x, y))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # at least one parameter actually receives gradient signal (shape adapters are wired)
    assert sum(float(p.grad.abs().sum()) for p in net.parameters()) > 0


def test_check_fit_agrees_with_builders_on_fabricated_shapes():
    for model in MODELS:
        for task, shape in [("classify", (3, 12)), ("classify", (1, 6, 6)), ("classify", (7,)),
                            ("regress", (4,)), ("lm", (9,))]:
            info = DataInfo("fake", task, shape, n_classes=3 if task == "classify" else None,
                            vocab_size=11 if task == "lm" else None)
            try:
                check_fit(model, "fake", task, len(shape))
            except ValueError:
                with pytest.raises(ValueError):
                    build_model(model, info, **SMALL[model])
                continue
            net = build_model(model, info, **SMALL[model])
            x = torch.randint(0, 11, (2, *shape)) if task == "lm" else torch.randn(2, *shape)
            assert net(x).shape[0] == 2


def test_seed_cnn_structure_and_layer_names():
    info = load_data("mnist1d").info
    net = build_model("seed-cnn", info)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv1d)]
    assert len(convs) == 5 and net.fc1.out_features == 450 and net.fc2.out_features == 10
    owners = {n.rpartition(".")[0] for n, _ in net.named_parameters()}
    assert owners == {f"conv{i}" for i in range(1, 6)} | {"fc1", "fc2"}
    assert isinstance(net.drop, torch.nn.Dropout)
    assert isinstance(build_model("seed-cnn", load_data("digits").info).conv1, torch.nn.Conv2d)
    net.eval()  # dropout off: deterministic
    x = torch.randn(3, 1, 40)
    torch.testing.assert_close(net(x), net(x))


def test_build_model_rejects_unknown_name_and_keyword():
    info = load_data("digits").info
    with pytest.raises(ValueError, match="model='vit' is unknown"):
        build_model("vit", info)
    with pytest.raises(ValueError, match="model_args=.*do not fit model='mlp'"):
        build_model("mlp", info, depth=3)


def test_gru_layer_equals_torch_gru():
    """Same weights → same hidden states as torch.nn.GRU (independent implementation)."""
    torch.manual_seed(0)
    ours, ref = GRULayer(5, 7), torch.nn.GRU(5, 7, batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(ours.ih.weight)
        ref.weight_hh_l0.copy_(ours.hh.weight)
        ref.bias_ih_l0.copy_(ours.ih.bias)
        ref.bias_hh_l0.copy_(ours.hh.bias)
    x = torch.randn(3, 6, 5)
    torch.testing.assert_close(ours(x), ref(x)[0], rtol=1e-5, atol=1e-6)


def test_attention_equals_scaled_dot_product_attention():
    torch.manual_seed(0)
    att = Attention(8, 2)
    x = torch.randn(3, 5, 8)
    q, k, v = att.qkv(x).view(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(3, 5, 8)
    torch.testing.assert_close(att(x), att.proj(ref), rtol=1e-5, atol=1e-6)
    # causal: the output at position t does not depend on inputs after t
    y = x.clone()
    y[:, 3:] += 1.0
    torch.testing.assert_close(att(x)[:, :3], att(y)[:, :3])


@pytest.mark.parametrize("model, data", [("gru", "pytext"), ("transformer", "pytext"), ("gru", "mnist1d")])
def test_double_backward_for_hessian_vector_products(model, data):
    """Hv by double backward equals a central finite difference of gradients
    (float64; step 1e-5 gives O(1e-10) truncation error)."""
    d = load_data(data)
    torch.manual_seed(0)
    net = build_model(model, d.info, **SMALL[model]).double()
    batch = ((d.x_train[:4] if d.info.task == "lm" else d.x_train[:4].double()), d.y_train[:4])
    loss_fn = make_loss_fn(d.info.task)
    params = list(net.parameters())
    v = [torch.randn_like(p) for p in params]
    grads = torch.autograd.grad(loss_fn(net, batch), params, create_graph=True)
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)

    def grad_at(eps):
        with torch.no_grad():
            for p, u in zip(params, v):
                p.add_(eps * u)
        g = torch.autograd.grad(loss_fn(net, batch), params)
        with torch.no_grad():
            for p, u in zip(params, v):
                p.sub_(eps * u)
        return g

    plus, minus = grad_at(1e-5), grad_at(-1e-5)
    for h, a, b in zip(hv, plus, minus):
        torch.testing.assert_close(h, (a - b) / 2e-5, rtol=1e-5, atol=1e-7)
