r"""Models, each built from a dataset's :class:`~experiments.runs.data.DataInfo`.

``build_model(name, info, **model_args)``; ``MODELS[name]`` is the class. Outputs:
``classify`` → logits (N, n_classes); ``lm`` → logits (N, seq_len, vocab_size);
``regress`` → predictions (N,). A combination that does not fit raises ValueError.
Parameter-owning submodules have names that read as layer names in a trace
("conv1".."conv5", "fc1", "fc2", "block2.conv1", "blocks.0.attn.qkv", ...).

==============  ==========================  =============================================
model           fits                        architecture
==============  ==========================  =============================================
seed-cnn        classify, 1-D or 2-D input  5 conv (kernel 3, channels ``channels``,
                                            stride 2 at conv2 and conv4) + fc1 (450) + fc2;
                                            leaky ReLU after every layer but the output,
                                            dropout after fc1 (the hidden FC layer: a
                                            dropout on the logits would make no sense)
mlp             classify, regress           flatten, ``hidden`` ReLU layers fc1.., output
resnet          classify, 1-D or 2-D input  stem conv+BN, 3 basic residual blocks
                                            (BatchNorm; widths w, 2w, 4w; stride 1, 2, 2),
                                            global average pool, fc
gru             classify, lm                GRU over a sequence: a (C, L) signal is L steps
                                            of C features, a (C, H, W) image H steps of
                                            C*W features (rows); lm embeds bytes and
                                            predicts the next one at every position
transformer     lm                          pre-LayerNorm causal transformer (learned
                                            positions)
linear          regress, classify           one bias-free linear map (``fc``): with linreg
                                            and MSE/2 the Hessian is the input covariance
==============  ==========================  =============================================

The GRU and the attention are written with plain tensor ops (not ``nn.GRU`` /
``scaled_dot_product_attention``) so that Hessian-vector products (double backward, used
by the sharpness probe) work on every device: cuDNN's RNN and the fused attention kernels
do not support double backward.
"""

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


#: which (task, number of input dims) each model fits; None: any number of dims
FITS = {
    "seed-cnn": {"classify": (2, 3)},
    "mlp": {"classify": None, "regress": None},
    "resnet": {"classify": (2, 3)},
    "gru": {"classify": (2, 3), "lm": (1,)},
    "transformer": {"lm": (1,)},
    "linear": {"regress": None, "classify": None},
}


def check_fit(model, data, task, ndim):
    """ValueError unless ``model`` fits a dataset of this task and input rank."""
    fits = FITS[model]
    if task not in fits:
        raise ValueError(f"model={model!r} does not fit data={data!r} (task {task!r}); "
                         f"it needs a task in: {', '.join(fits)}")
    if fits[task] is not None and ndim not in fits[task]:
        raise ValueError(f"model={model!r} does not fit data={data!r}: its inputs have {ndim} dims "
                         f"(channels first), {model!r} needs {' or '.join(map(str, fits[task]))} for {task!r}")


def _require(info, model):
    check_fit(model, info.name, info.task, len(info.input_shape))


def _out_features(info):
    return 1 if info.task == "regress" else info.n_classes


def _spatial(info):
    """Conv and BatchNorm classes for a (C, L) or (C, H, W) input."""
    if len(info.input_shape) == 2:
        return nn.Conv1d, nn.BatchNorm1d
    return nn.Conv2d, nn.BatchNorm2d


class SeedCNN(nn.Module):
    """``activation`` "leaky_relu" (the seed's, slope ``negative_slope``) or one of
    :data:`ACTIVATIONS` (a smooth one, "gelu" or "tanh", where a theory needs derivatives beyond
    the second: the central flow's right-hand side jumps at the leaky ReLU's kinks)."""

    def __init__(self, info, channels=32, hidden=450, dropout=0.25, negative_slope=0.01, activation="leaky_relu"):
        super().__init__()
        _require(info, "seed-cnn")
        if activation != "leaky_relu" and activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is unknown; valid: leaky_relu, {', '.join(ACTIVATIONS)}")
        self.act = functools.partial(F.leaky_relu, negative_slope=negative_slope) if activation == "leaky_relu" else ACTIVATIONS[activation]
        conv, _ = _spatial(info)
        in_ch = info.input_shape[0]
        for i, stride in enumerate((1, 2, 1, 2, 1), start=1):
            setattr(self, f"conv{i}", conv(in_ch, channels, 3, stride=stride, padding=1))
            in_ch = channels
        self.negative_slope = negative_slope
        with torch.no_grad():
            n_flat = self._features(torch.zeros(1, *info.input_shape)).shape[1]
        self.fc1 = nn.Linear(n_flat, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, info.n_classes)

    def _features(self, x):
        for i in range(1, 6):
            x = self.act(getattr(self, f"conv{i}")(x))
        return x.flatten(1)

    def forward(self, x):
        x = self.drop(self.act(self.fc1(self._features(x))))
        return self.fc2(x)


ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu}


class MLP(nn.Module):
    """Fully connected layers ``fc1..fcN`` with ``activation`` between them ("relu", or a
    smooth one, "tanh" or "gelu", where a theory needs derivatives beyond the second: the
    central flow's ODE solver stalls at ReLU kinks)."""

    def __init__(self, info, hidden=(128, 128), activation="relu"):
        super().__init__()
        _require(info, "mlp")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is unknown; valid: {', '.join(ACTIVATIONS)}")
        self.activation = ACTIVATIONS[activation]
        widths = [math.prod(info.input_shape), *hidden, _out_features(info)]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            setattr(self, f"fc{i}", nn.Linear(a, b))
        self.n_layers = len(widths) - 1
        self.squeeze = info.task == "regress"

    def forward(self, x):
        x = x.flatten(1)
        for i in range(1, self.n_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.n_layers:
                x = self.activation(x)
        return x.squeeze(1) if self.squeeze else x


class BasicBlock(nn.Module):
    """x ↦ relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut x); shortcut is a strided 1×1
    conv + BN when the shape changes (He et al. 2016)."""

    def __init__(self, conv, bn, in_ch, out_ch, stride, act=F.relu):
        super().__init__()
        self.act = act
        self.conv1 = conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = bn(out_ch)
        self.proj = self.proj_bn = None
        if stride != 1 or in_ch != out_ch:
            self.proj = conv(in_ch, out_ch, 1, stride=stride, bias=False)
            self.proj_bn = bn(out_ch)

    def forward(self, x):
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        short = x if self.proj is None else self.proj_bn(self.proj(x))
        return self.act(out + short)


class ResNet(nn.Module):
    """``activation`` "relu" (as built) or one of :data:`ACTIVATIONS` (a smooth one where a
    theory needs derivatives beyond the second, as for :class:`SeedCNN`)."""

    def __init__(self, info, width=16, activation="relu"):
        super().__init__()
        _require(info, "resnet")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is unknown; valid: {', '.join(ACTIVATIONS)}")
        self.act = act = ACTIVATIONS[activation]
        conv, bn = _spatial(info)
        self.conv = conv(info.input_shape[0], width, 3, padding=1, bias=False)
        self.bn = bn(width)
        self.block1 = BasicBlock(conv, bn, width, width, 1, act)
        self.block2 = BasicBlock(conv, bn, width, 2 * width, 2, act)
        self.block3 = BasicBlock(conv, bn, 2 * width, 4 * width, 2, act)
        self.fc = nn.Linear(4 * width, info.n_classes)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(x.flatten(2).mean(2))


class GRULayer(nn.Module):
    r"""One GRU layer, PyTorch's equations (``torch.nn.GRU``):
    r = σ(W_ir x + W_hr h), z = σ(W_iz x + W_hz h), n = tanh(W_in x + r ⊙ (W_hn h)),
    h' = (1 − z) ⊙ n + z ⊙ h (biases inside ``ih`` and ``hh``)."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 3 * hidden_size)
        self.hh = nn.Linear(hidden_size, 3 * hidden_size)
        bound = 1 / math.sqrt(hidden_size)  # nn.GRU's init
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x):
        """x: (N, T, input_size) → all hidden states (N, T, hidden_size)."""
        gates_x = self.ih(x)
        h = x.new_zeros(x.shape[0], self.hidden_size)
        out = []
        for t in range(x.shape[1]):
            xr, xz, xn = gates_x[:, t].chunk(3, 1)
            hr, hz, hn = self.hh(h).chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            out.append(h)
        return torch.stack(out, 1)


class GRUModel(nn.Module):
    def __init__(self, info, hidden=64, embed=32):
        super().__init__()
        _require(info, "gru")
        self.lm = info.task == "lm"
        if self.lm:
            self.embed = nn.Embedding(info.vocab_size, embed)
            n_in = embed
        else:
            n_in = info.input_shape[0] * (info.input_shape[2] if len(info.input_shape) == 3 else 1)
        self.gru = GRULayer(n_in, hidden)
        self.head = nn.Linear(hidden, info.vocab_size if self.lm else info.n_classes)

    def forward(self, x):
        if self.lm:
            return self.head(self.gru(self.embed(x)))
        if x.dim() == 3:                      # (N, C, L) → L steps of C features
            seq = x.transpose(1, 2)
        else:                                 # (N, C, H, W) → H steps of C*W features
            seq = x.permute(0, 2, 1, 3).flatten(2)
        return self.head(self.gru(seq)[:, -1])


class Attention(nn.Module):
    """Causal multi-head self-attention, softmax(QKᵀ/√d + mask) V, in plain ops."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, info, dim=64, layers=2, heads=4):
        super().__init__()
        _require(info, "transformer")
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.embed = nn.Embedding(info.vocab_size, dim)
        self.pos = nn.Embedding(info.input_shape[0], dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, info.vocab_size)

    def forward(self, x):
        x = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class Linear(nn.Module):
    def __init__(self, info):
        super().__init__()
        _require(info, "linear")
        self.fc = nn.Linear(math.prod(info.input_shape), _out_features(info), bias=False)
        self.squeeze = info.task == "regress"

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out.squeeze(1) if self.squeeze else out


MODELS = {
    "seed-cnn": SeedCNN,
    "mlp": MLP,
    "resnet": ResNet,
    "gru": GRUModel,
    "transformer": Transformer,
    "linear": Linear,
}


def build_model(name, info, **model_args) -> nn.Module:
    """``MODELS[name](info, **model_args)``; unknown name, unfit data or a bad keyword
    raise ValueError."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is unknown; valid: {', '.join(MODELS)}")
    try:
        return MODELS[name](info, **model_args)
    except TypeError as err:
        if "argument" not in str(err):
            raise
        raise ValueError(f"model_args={model_args!r} do not fit model={name!r}: {err}") from None


def _stand_in(task, ndim):
    """A small DataInfo of this task and input rank (what the model builders read)."""
    from experiments.runs.data import DataInfo

    shape = {1: (16,) if task == "lm" else (4,), 2: (1, 16), 3: (1, 8, 8)}[ndim]
    return DataInfo("stand-in", task, shape, n_classes=None if task != "classify" else 10,
                    vocab_size=256 if task == "lm" else None)


@functools.lru_cache(maxsize=512)
def check_model_args(name, task, ndim, model_args):
    """ValueError (naming ``model_args``) unless ``build_model(name, info, **model_args)``
    builds, with no empty layer, for a stand-in dataset of this task and input rank. Built
    on the meta device: no memory, no arithmetic (about a millisecond). ``model_args`` is
    the config's sorted tuple of pairs (lists as tuples)."""
    thaw = lambda v: [thaw(x) for x in v] if isinstance(v, tuple) else v  # noqa: E731
    kwargs = {k: thaw(v) for k, v in model_args}
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
            model = build_model(name, _stand_in(task, ndim), **kwargs)
    except ValueError as err:
        raise ValueError(f"model_args={kwargs!r} do not fit model={name!r}: {err}") from None
    except (RuntimeError, TypeError, ZeroDivisionError, OverflowError, IndexError) as err:
        raise ValueError(f"model_args={kwargs!r} do not fit model={name!r} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); sizes must be integers >= 1") from None
    for pname, p in model.named_parameters():
        if p.numel() == 0:
            raise ValueError(f"model_args={kwargs!r} give model={name!r} an empty layer ({pname} has shape "
                             f"{tuple(p.shape)}); sizes must be integers >= 1")
