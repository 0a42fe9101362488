"""What every distillation method is: `Method`, the inputs of its loss (`StepInputs`), and how it reads
intermediate features (forward hooks on named modules, no model surgery).

A method is an nn.Module holding only its own trainable parts (connectors, regressors): DistillModule keeps it
as `self.method`, so those parts are saved under `method.*` in the student checkpoint (never under `net.*`:
`checkpoints.load_net` rebuilds the bare student without them) and the optimizer receives them with the
student's parameters.
"""

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from kd_lightning.errors import ConfigError

LossTerms = dict[str, Tensor]
TeacherLoader = Callable[[Any, Path], nn.Module]  # (the run's config naming one teacher, its ckpt) -> net
TeacherLogits = Callable[[Path, nn.Module], dict[str, Tensor]]  # (ckpt, net) -> its cached logits per split
INPUT_SUFFIX = ":input"  # "fc:input" reads what goes into module `fc` (e.g. the penultimate embedding)


@dataclass
class StepInputs:
    """What a method's loss may read in one training step."""

    logits: Tensor  # the student's
    labels: Tensor
    teacher_log_probs: Tensor | None = None  # log softmax(teacher logits / method.T); None if not needed
    features: dict[str, Tensor] = field(default_factory=dict)  # student, by layer spec
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    progress: float = 0.0  # epochs trained so far, fractional (warm-ups)
    indices: Tensor | None = None  # the examples' positions in the train split (per-example state: CRD)


# ---- hyper-parameter checks: one line naming key, value and what is accepted (like distill.T) ---------------
def _number(v: object) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def positive(v: object) -> bool:
    return _number(v) and v > 0


def non_negative(v: object) -> bool:
    return _number(v) and v >= 0


def unit_interval(v: object) -> bool:
    return _number(v) and 0 <= v <= 1


def layer_specs(v: object) -> bool:
    """null (the net's default layers) or a list of module paths."""
    return v is None or (isinstance(v, Sequence) and not isinstance(v, str) and all(isinstance(s, str) for s in v))


def layer_spec(v: object) -> bool:
    return v is None or isinstance(v, str)


CHECKS: dict[Callable[[object], bool], str] = {
    positive: "a number > 0",
    non_negative: "a number >= 0",
    unit_interval: "a number in [0, 1]",
    layer_specs: "null or a list of module paths, e.g. [layer1, layer2]",
    layer_spec: "null or a module path, e.g. layer2 or features.3 (fc:input = the input of fc)",
}


class Method(nn.Module):
    """A distillation method: its loss, and what that loss needs.

    Subclasses set `name` (the `distill.method` value), `hparams` (their keys under `distill.<name>` and the
    check of each value) and `uses_teacher` (False: no teacher is built or trained), and implement `forward`.
    In `__init__` they set what they read: `needs_teacher_targets` (the teacher's log-probabilities at `self.T`,
    from the logit cache where there is one), `student_layers` / `teacher_layers` (layer specs: module paths,
    or `<path>:input`; teacher layers make the teacher run online on every training batch). Trainable parts
    whose shapes depend on the features are made in `build(student_features, teacher_features)`, called once
    with the features of a probe batch before the optimizer is made.
    """

    name: ClassVar[str]
    hparams: ClassVar[dict[str, Callable[[object], bool]]] = {}
    uses_teacher: ClassVar[bool] = True

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__()
        self.hp: dict[str, Any] = dict(distill.get(self.name) or {})
        self.T: float = distill["T"]
        self.needs_teacher_targets = False
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []

    @classmethod
    def check(cls, distill: Mapping[str, Any]) -> None:
        """Validate `distill.<name>.*` before anything is built or trained."""
        section = distill.get(cls.name) or {}
        for key, ok in cls.hparams.items():
            value = section.get(key)
            if not ok(value):
                raise ConfigError(f"distill.{cls.name}.{key}={value!r} is not accepted: {CHECKS[ok]}")

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Resolve default layers (a net's `feature_layers`, the input of its last Linear) against the nets."""

    def bind_data(self, datamodule: Any) -> None:
        """Read what the loss needs of the training split (a KDDataModule, set up), once, before `build`
        (CRD: the split's size and labels, for its memory bank)."""

    def build(self, features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        """Make the trainable parts that depend on feature shapes (called once, before the optimizer)."""

    def forward(self, step: StepInputs) -> LossTerms:
        raise NotImplementedError

    # ---- the teacher(s) ---------------------------------------------------------------------------------------
    @classmethod
    def teacher_runs(cls, cfg: Any) -> list[Any]:
        """The run's config once per teacher, its `teacher:` section naming that teacher: train.py ensures each
        (cached, or trained now) before building. [] for a method without a teacher."""
        return [cfg] if cls.uses_teacher else []

    # The orchestrator (train.py) passes the loading functions in: methods never import the teacher cache.
    @classmethod
    def load_teacher(cls, cfg: Any, ckpts: list[Path], load: TeacherLoader) -> nn.Module | None:
        """The teacher net the module distills from: `load(run_cfg, ckpt)` for each of `teacher_runs`."""
        return load(cfg, ckpts[0]) if ckpts else None

    @classmethod
    def cached_teacher_logits(cls, teacher: nn.Module, ckpts: list[Path], logits_of: TeacherLogits
                              ) -> dict[str, Tensor]:
        """The teacher's logits per split, `logits_of(ckpt, net)` being the cached logits of one teacher."""
        return logits_of(ckpts[0], teacher)


# ---- features without model surgery ----------------------------------------------------------------------------
def find_module(net: nn.Module, spec: str, role: str) -> nn.Module:
    path = spec.removesuffix(INPUT_SUFFIX)
    try:
        return net.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in net.named_modules() if n][:12]
        raise ConfigError(f"{role} layer {spec!r} is not a module of {type(net).__name__}; "
                          f"accepted: module paths such as {', '.join(names)}") from None


def last_linear_input(net: nn.Module) -> str:
    """The spec of the penultimate embedding: the input of the net's last nn.Linear (its classifier head)."""
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(net).__name__} has no nn.Linear head: name the embedding layer explicitly")
    return linears[-1] + INPUT_SUFFIX


def default_feature_layers(net: nn.Module, role: str, key: str) -> list[str]:
    layers = list(getattr(net, "feature_layers", ()))
    if not layers:
        raise ConfigError(f"{key}=null needs the {role} net to declare feature maps, but {type(net).__name__} "
                          f"declares none (feature_layers): use a conv net (e.g. model=mnist_conv_student) or set {key}")
    return layers


@contextmanager
def capture(net: nn.Module, specs: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Within the block, each forward of `net` stores the output (or, for `<path>:input`, the first input)
    of each named module in the yielded dict. The hooks are removed on exit."""
    found: dict[str, Tensor] = {}
    handles = []
    for spec in specs:
        module = net.get_submodule(spec.removesuffix(INPUT_SUFFIX))
        if spec.endswith(INPUT_SUFFIX):
            handles.append(module.register_forward_pre_hook(lambda m, args, s=spec: found.__setitem__(s, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, s=spec: found.__setitem__(s, out)))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
