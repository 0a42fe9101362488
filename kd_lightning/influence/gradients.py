"""Per-example gradient embeddings with torch.func, for TracIn's dot products.

For one checkpoint, the gradient of the loss of example z is embedded so that `dot(embed(z), embed(z'))` is
the dot product of the two per-example gradients over the selected parameters. Two kinds of parameters:

- A selected `nn.Linear` layer (fed a [batch, in] input): its per-example weight gradient is the outer product
  δ ⊗ a of δ = dℓ/d(output) and the layer's input a, and its bias gradient is δ. So
  ⟨∇W ℓ(z), ∇W ℓ(z')⟩ + ⟨∇b ℓ(z), ∇b ℓ(z')⟩ = (δ·δ')(a·a' + 1): the layer is embedded as the pair (δ, ã) with
  ã = [a, 1] (a alone, or [1] alone, when only the weight or only the bias is selected). That is out + in + 1
  numbers instead of out × (in + 1): the MNIST CNN's fc1 (1.18 M weights) becomes 9,345.
- Every other selected parameter (convolutions, norms, ...): the flattened per-example gradient.

Both come from one `vmap(grad(...))` over a per-example loss evaluated with `functional_call`: δ is the gradient
with respect to a zero "probe" added to each factored Linear's output by a forward hook, which also captures
the layer's input a (returned as `grad`'s auxiliary output). The net must be in eval mode (dropout off, batch
norm on running statistics): each example's loss then depends on that example alone.

An optional `RandomProjection` maps every embedding to `dim` numbers whose dot products estimate the exact
ones without bias (see its docstring).
"""

import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from kd_lightning.errors import ConfigError

# loss(logits [1, C], *targets each [1, ...]) -> scalar: the loss of one example, traced by TracIn.
ExampleLoss = Callable[..., Tensor]


# ---- which parameters --------------------------------------------------------------------------------------
def last_layer(net: nn.Module) -> str:
    """Name of the net's last nn.Linear (its classifier head) in registration order."""
    linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ConfigError(f"params=last is not accepted for {type(net).__name__}: it has no nn.Linear layer")
    return linears[-1]


def select_parameters(net: nn.Module, params: str | Sequence[str]) -> list[str]:
    """Names of the parameters TracIn uses: `"all"`, `"last"` (the last Linear layer, weight and bias), or a list
    of layer names / parameter-name prefixes (`["features.0", "classifier.3.bias"]`)."""
    names = [name for name, _ in net.named_parameters()]
    if params == "all":
        return names
    if params == "last":
        prefixes = [last_layer(net)]
    elif isinstance(params, str):
        raise ConfigError(f"params={params!r} is not accepted: all, last, auto or a list of layer names")
    else:
        prefixes = list(params)
    selected = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            layers = sorted({n.rsplit(".", 1)[0] for n in names})
            raise ConfigError(
                f"params entry {prefix!r} names no parameter of {type(net).__name__}; its layers are {', '.join(layers)}"
            )
    return selected


# ---- embeddings --------------------------------------------------------------------------------------------
@dataclass
class Embedding:
    """Per-example gradient embeddings of a batch of B examples.

    `flat`: [B, P] flattened gradients of the non-factored parameters (or [B, dim] once projected);
    `linear`: per factored Linear layer, (δ [B, out], ã [B, in (+1)]).
    """

    flat: Tensor | None
    linear: list[tuple[Tensor, Tensor]]

    def __len__(self) -> int:
        return len(self.flat) if self.flat is not None else len(self.linear[0][0])

    @property
    def width(self) -> int:
        """Numbers stored per example."""
        flat = self.flat.shape[1] if self.flat is not None else 0
        return flat + sum(d.shape[1] + a.shape[1] for d, a in self.linear)

    @staticmethod
    def cat(parts: Sequence["Embedding"]) -> "Embedding":
        flat = torch.cat([p.flat for p in parts]) if parts[0].flat is not None else None
        linear = [
            (torch.cat([p.linear[i][0] for p in parts]), torch.cat([p.linear[i][1] for p in parts]))
            for i in range(len(parts[0].linear))
        ]
        return Embedding(flat, linear)


def dot(a: Embedding, b: Embedding) -> Tensor:
    """[len(a), len(b)] gradient dot products, by matrix products only."""
    out = a.flat @ b.flat.T if a.flat is not None else 0
    for (delta_a, act_a), (delta_b, act_b) in zip(a.linear, b.linear):
        out = out + (delta_a @ delta_b.T) * (act_a @ act_b.T)
    return out


def squared_norms(a: Embedding) -> Tensor:
    """[len(a)]: each example's own gradient dot product (its self-influence at this checkpoint)."""
    out = a.flat.square().sum(1) if a.flat is not None else 0
    for delta, act in a.linear:
        out = out + delta.square().sum(1) * act.square().sum(1)
    return out


class RandomProjection:
    """A fixed Gaussian sketch of gradients to `dim` numbers, the same for every checkpoint and batch.

    The flat part g is mapped to gR/√dim (R: [P, dim], N(0, 1) entries). A factored Linear layer's gradient
    δ ⊗ ã is mapped to (δR₁) ⊙ (ãR₂)/√dim (R₁: [out, dim], R₂: [in+1, dim]): column k of that sketch is the
    projection on r₁ₖ ⊗ r₂ₖ, so the outer product is never formed. The parts are summed. Either way
    E[⟨P(g), P(g')⟩] = ⟨g, g'⟩, with a relative error that shrinks like 1/√dim (measured in docs/influence.md).
    Memory: 4·dim·(P + Σ(out + in + 1)) bytes of matrices, generated once per layer from `seed` and the name.
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        if not (isinstance(dim, int) and dim > 0):
            raise ConfigError(f"projection_dim={dim!r} is not accepted: a positive integer, or null for exact scores")
        self.dim, self.seed = dim, seed
        self._matrices: dict[tuple[str, int, torch.dtype, torch.device], Tensor] = {}

    def matrix(self, key: str, rows: int, like: Tensor) -> Tensor:
        cache_key = (key, rows, like.dtype, like.device)
        if cache_key not in self._matrices:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
            m = torch.randn(rows, self.dim, generator=generator, dtype=torch.float64)
            self._matrices[cache_key] = m.to(like.dtype).to(like.device)
        return self._matrices[cache_key]

    def __call__(self, emb: Embedding, linear_names: Sequence[str]) -> Embedding:
        parts = []
        if emb.flat is not None:
            parts.append(emb.flat @ self.matrix("flat", emb.flat.shape[1], emb.flat))
        for name, (delta, act) in zip(linear_names, emb.linear):
            parts.append((delta @ self.matrix(f"{name}/out", delta.shape[1], delta))
                         * (act @ self.matrix(f"{name}/in", act.shape[1], act)))
        return Embedding(torch.stack(parts).sum(0) / self.dim**0.5, [])


class GradientEmbedder:
    """Per-example gradient embeddings of one net (one checkpoint) for a chosen parameter set and loss.

    `factor_linear=False` treats Linear layers like any other parameter (flattened outer products: exact too,
    but out × in numbers per example); tests use it to check the factored form against the plain one.
    """

    def __init__(
        self,
        net: nn.Module,
        param_names: Sequence[str],
        loss: ExampleLoss,
        factor_linear: bool = True,
        projection: RandomProjection | None = None,
    ) -> None:
        self.net = net.eval()
        self.loss, self.projection = loss, projection
        selected = set(param_names)
        # name -> (module, weight selected, bias selected) for every Linear with a selected parameter
        self.linears: dict[str, tuple[nn.Linear, bool, bool]] = {}
        if factor_linear:
            for name, module in net.named_modules():
                if isinstance(module, nn.Linear):
                    weight, bias = f"{name}.weight" in selected, module.bias is not None and f"{name}.bias" in selected
                    if weight or bias:
                        self.linears[name] = (module, weight, bias)
        factored = {f"{name}.{p}" for name in self.linears for p in ("weight", "bias")}
        self.flat_names = [n for n, _ in net.named_parameters() if n in selected and n not in factored]
        params = dict(net.named_parameters())
        self.frozen = {n: p.detach() for n, p in params.items() if n not in self.flat_names}
        self.buffers = dict(net.named_buffers())

    @property
    def num_params(self) -> int:
        """Parameters whose gradients the embeddings represent."""
        n = self.flat_numel
        for module, weight, bias in self.linears.values():
            n += module.weight.numel() * weight + (module.bias.numel() if bias else 0)
        return n

    @property
    def flat_numel(self) -> int:
        """Parameters whose per-example gradients are flattened (P_flat)."""
        params = dict(self.net.named_parameters())
        return sum(params[name].numel() for name in self.flat_names)

    @property
    def exact_width(self) -> int:
        """Numbers per example of an unprojected embedding: P_flat + Σ_Linear(out + in (+1))."""
        return self.flat_numel + sum(
            module.out_features + module.in_features * weight + bias for module, weight, bias in self.linears.values()
        )

    @contextmanager
    def _probed(self, probes: dict[str, Tensor], inputs: dict[str, Tensor]) -> Iterator[None]:
        """Hooks adding a probe to each factored Linear's output and capturing its input."""

        def hook(name: str) -> Callable:
            def add_probe(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
                if args[0].dim() != 2 or name in inputs:
                    raise ConfigError(
                        f"Linear layer {name} is not fed one [batch, features] input per forward "
                        f"({tuple(args[0].shape)}); use factor_linear=false"
                    )
                inputs[name] = args[0]
                return output + probes[name]
            return add_probe

        handles = [module.register_forward_hook(hook(name)) for name, (module, _, _) in self.linears.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _example_loss(self, flat_params: dict[str, Tensor], probes: dict[str, Tensor], x: Tensor,
                      targets: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs: dict[str, Tensor] = {}
        with self._probed(probes, inputs):
            logits = functional_call(self.net, {**self.frozen, **self.buffers, **flat_params}, (x.unsqueeze(0),))
        return self.loss(logits, *(t.unsqueeze(0) for t in targets)), inputs

    def embed(self, x: Tensor, targets: tuple[Tensor, ...], scale: float = 1.0) -> Embedding:
        """Embeddings of the batch `x` with per-example `targets` (labels, teacher logits...), times `scale`
        (√η for TracIn, so that a dot product carries η once)."""
        params = dict(self.net.named_parameters())
        flat_params = {n: params[n].detach() for n in self.flat_names}
        probes = {name: x.new_zeros(1, module.out_features) for name, (module, _, _) in self.linears.items()}
        per_example = vmap(grad(self._example_loss, argnums=(0, 1), has_aux=True), in_dims=(None, None, 0, 0))
        (flat_grads, probe_grads), inputs = per_example(flat_params, probes, x, targets)

        batch = len(x)
        flat = None
        if self.flat_names:
            flat = torch.cat([flat_grads[n].reshape(batch, -1) for n in self.flat_names], 1) * scale
        linear = []
        for name, (_, weight, bias) in self.linears.items():
            act = inputs[name].reshape(batch, -1)
            act = torch.cat([act] * weight + [act.new_ones(batch, 1)] * bias, 1)
            linear.append((probe_grads[name].reshape(batch, -1) * scale, act))
        emb = Embedding(flat, linear)
        return self.projection(emb, list(self.linears)) if self.projection else emb


# ---- the plain reference -----------------------------------------------------------------------------------
def loop_gradients(net: nn.Module, param_names: Sequence[str], loss: ExampleLoss, x: Tensor,
                   targets: tuple[Tensor, ...]) -> Tensor:
    """[B, P] per-example gradients by a plain Python loop of torch.autograd.grad (eval mode): the reference
    that tests and the benchmark compare the embeddings with."""
    net.eval()
    params = dict(net.named_parameters())
    chosen = [params[n] for n in param_names]
    rows = []
    for i in range(len(x)):
        value = loss(net(x[i : i + 1]), *(t[i : i + 1] for t in targets))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, chosen)]))
    return torch.stack(rows)
