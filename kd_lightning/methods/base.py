"""What every distillation method is: `Method`, the inputs of its loss (`StepInputs`), the registry
(`register`, `METHODS`), and how it reads intermediate features (forward hooks on named modules, no model
surgery). A method file imports from here (not from `kd_lightning.methods`, whose `__init__` imports the method
files).

A method is an nn.Module holding only its own trainable parts (connectors, regressors): DistillModule keeps it
as `self.method`, so those parts are saved under `method.*` in the student checkpoint (never under `net.*`:
`checkpoints.load_net` rebuilds the bare student without them) and the optimizer receives them with the
student's parameters.
"""

import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import kd_term, soft_targets, standardize

LossTerms = dict[str, Tensor]
TeacherLoader = Callable[[Any, Path], nn.Module]  # (the run's config naming one teacher, its ckpt) -> net
TeacherLogits = Callable[[Path, nn.Module], dict[str, Tensor]]  # (ckpt, net) -> its cached logits per split
INPUT_SUFFIX = ":input"  # "fc:input" reads what goes into module `fc` (e.g. the penultimate embedding)


@dataclass
class StepInputs:
    """What a method's loss may read in one training step."""

    logits: Tensor  # the student's
    labels: Tensor
    teacher_log_probs: Tensor | None = None  # method.teacher_targets(teacher logits); None if not needed
    features: dict[str, Tensor] = field(default_factory=dict)  # student, by layer spec
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    progress: float = 0.0  # epochs trained so far, fractional (warm-ups); the epoch in progress is int(progress)
    teacher_logits: Tensor | None = None  # the teacher's raw logits (no grad), beside teacher_log_probs
    indices: Tensor | None = None  # the examples' positions in the train split (per-example state: CRD)


METHODS: dict[str, type["Method"]] = {}


def register(method: type["Method"]) -> type["Method"]:
    """Make `distill.method=<method.name>` select `method` (a class decorator). Files in kd_lightning/methods/
    are imported when the package is, so `@register` on a class there is all it takes."""
    METHODS[method.name] = method
    return method


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


def boolean(v: object) -> bool:
    return isinstance(v, bool)


CHECKS: dict[Callable[[object], bool], str] = {
    positive: "a number > 0",
    non_negative: "a number >= 0",
    unit_interval: "a number in [0, 1]",
    layer_specs: "null or a list of module paths, e.g. [layer1, layer2]",
    layer_spec: "null or a module path, e.g. layer2 or features.3 (fc:input = the input of fc)",
    boolean: "true or false",
}


def one_of(*choices: str) -> Callable[[object], bool]:
    """A check accepting exactly `choices` (its message lists them)."""
    def check(v: object) -> bool:
        return v in choices

    CHECKS[check] = "one of " + ", ".join(choices)
    return check


# The methods whose soft term may read z-scored logits (`distill.logit_standardization=true`).
LOGIT_STANDARDIZATION_METHODS = ("kd", "dkd", "multi_teacher")


def config_value(v: object) -> str:
    """A setting as the config spells it (null, not None)."""
    return "null" if v is None else str(v)


class Method(nn.Module):
    """A distillation method: its loss, and what that loss needs.

    Subclasses set `name` (the `distill.method` value), `defaults` (their hyper-parameters and values: a
    `distill.<name>` section in the config overrides them key by key, and may be left out), `hparams` (the
    check of each key) and `uses_teacher` (False: no teacher is built or trained), and implement `forward`.
    In `__init__` they set what they read: `needs_teacher_targets` (the teacher's outputs on training batches,
    `step.teacher_logits` and `step.teacher_log_probs` = `teacher_targets(logits)`, from the logit cache where
    there is one), `student_layers` / `teacher_layers` (layer specs: module paths, or `<path>:input`; teacher
    layers make the teacher run online on every training batch). Trainable parts whose shapes depend on the
    features are made in `build(student_features, teacher_features)`, called once with the features of a probe
    batch before the optimizer is made.

    `self.T` is the temperature of the method's soft term: `distill.T` unless the method has its own (dkd),
    and `distill.base_T` when `distill.logit_standardization=true` (then `prepare_logits` z-scores logits
    before that softmax, the student's and the teacher's).
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    hparams: ClassVar[dict[str, Callable[[object], bool]]] = {}
    uses_teacher: ClassVar[bool] = True
    min_batch: ClassVar[int] = 1  # relational terms need this many examples; smaller batches skip them

    def __init__(self, distill: Mapping[str, Any]) -> None:
        super().__init__()
        self.hp: dict[str, Any] = self.settings(distill)
        self.standardize: bool = bool(distill.get("logit_standardization", False))
        self.T: float = distill.get("base_T", 2.0) if self.standardize else distill["T"]
        self.needs_teacher_targets = False
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []
        self.small_batches_skipped = 0  # training batches whose relational term was left out (size < min_batch)

    @classmethod
    def settings(cls, distill: Mapping[str, Any]) -> dict[str, Any]:
        """The method's hyper-parameters: its `defaults`, overridden key by key by `distill.<name>`."""
        return {**cls.defaults, **(distill.get(cls.name) or {})}

    @classmethod
    def check(cls, distill: Mapping[str, Any]) -> None:
        """Validate `distill.<name>.*` (and the logit-standardization switch) before anything is built or trained."""
        hp = cls.settings(distill)
        if missing := [key for key in cls.hparams if key not in hp]:
            raise ConfigError(f"distill.method={cls.name} needs {', '.join(f'distill.{cls.name}.{k}' for k in missing)}: "
                              f"give {'them' if len(missing) > 1 else 'it'} on the command line (+distill.{cls.name}."
                              f"{missing[0]}=...) or in the defaults of the method's class")
        for key, ok in cls.hparams.items():
            if not ok(hp[key]):
                raise ConfigError(f"distill.{cls.name}.{key}={hp[key]!r} is not accepted: {CHECKS[ok]}")
        standardize = distill.get("logit_standardization", False)
        if not boolean(standardize):
            raise ConfigError(f"distill.logit_standardization={standardize!r} is not accepted: true or false")
        if standardize and cls.name not in LOGIT_STANDARDIZATION_METHODS:
            raise ConfigError(f"distill.logit_standardization=true is not accepted with distill.method={cls.name}: "
                              f"it applies to {', '.join(LOGIT_STANDARDIZATION_METHODS)}")
        if standardize and not positive(distill.get("base_T")):
            raise ConfigError(f"distill.base_T={distill.get('base_T')!r} is not accepted: a number > 0")

    @classmethod
    def describe(cls, distill: Mapping[str, Any]) -> str:
        """The method and its own settings in one line (the run summary, TensorBoard's HParams)."""
        text = ", ".join(f"{k}={config_value(v)}" for k, v in cls.settings(distill).items())
        if distill.get("logit_standardization"):
            text += f"; logit standardization at base_T={distill.get('base_T')}"
        return f"{cls.name} ({text})"

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Resolve default layers (a net's `feature_layers`, the input of its last Linear) against the nets."""

    def bind_data(self, datamodule: Any) -> None:
        """Read what the loss needs of the training split (a KDDataModule, set up), once, before `build`
        (CRD: the split's size and labels, for its memory bank)."""

    def build(self, features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        """Make the trainable parts that depend on feature shapes (called once, before the optimizer)."""

    def forward(self, step: StepInputs) -> LossTerms:
        raise NotImplementedError

    # ---- the soft term's temperature softmax --------------------------------------------------------------
    def prepare_logits(self, logits: Tensor) -> Tensor:
        """What the temperature softmax reads: the logits, z-scored per row with logit standardization."""
        return standardize(logits) if self.standardize else logits

    def teacher_targets(self, teacher_logits: Tensor) -> Tensor:
        """The teacher's log-probabilities at `self.T` (detached): `step.teacher_log_probs`, cached once."""
        return soft_targets(self.prepare_logits(teacher_logits), self.T)

    def soft_term(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """T^2 KL(teacher || student) at the method's own temperature (and standardization): val/test soft_loss."""
        return kd_term(self.prepare_logits(student_logits), self.teacher_targets(teacher_logits), self.T)

    def skip_small_batch(self, n: int) -> bool:
        """True (and counted) for a training batch too small for the method's relational terms."""
        if n >= self.min_batch:
            return False
        if self.training:
            self.small_batches_skipped += 1
        return True

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
        all_names = [n for n, _ in net.named_modules() if n]
        near = difflib.get_close_matches(path, all_names, n=8, cutoff=0.5)  # the valid paths nearest the typo
        names = near or [n for n in all_names if "." not in n][:12]
        raise ConfigError(f"{role} layer {spec!r} is not a module of {type(net).__name__}; "
                          f"accepted: module paths such as {', '.join(names)}") from None


def last_linear_input(net: nn.Module) -> str:
    """The spec of the penultimate embedding: the input of the net's last nn.Linear (its classifier head)."""
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(net).__name__} has no nn.Linear head: name the embedding layer explicitly")
    return linears[-1] + INPUT_SUFFIX


def bind_embedding_layers(method: "Method", student: nn.Module, teacher: nn.Module | None) -> None:
    """For methods on the penultimate embedding (rkd, crd): `distill.<name>.student_layer`/`teacher_layer`, by default
    the input of each net's classifier head, checked to exist."""
    s = method.hp["student_layer"] or last_linear_input(student)
    find_module(student, s, f"distill.{method.name}.student_layer")
    method.student_layers = [s]
    if teacher is not None:
        t = method.hp["teacher_layer"] or last_linear_input(teacher)
        find_module(teacher, t, f"distill.{method.name}.teacher_layer")
        method.teacher_layers = [t]


def default_feature_layers(net: nn.Module, role: str, key: str) -> list[str]:
    layers = list(getattr(net, "feature_layers", ()))
    if not layers:
        raise ConfigError(f"{key}=null needs the {role} net to declare feature maps, but {type(net).__name__} "
                          f"declares none (its feature_layers attribute, docs/models.md): set {key} to module paths of it, "
                          f"or use a net that declares them (e.g. model=mnist_conv_student, model=timm)")
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
