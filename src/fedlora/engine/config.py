"""The experiment configuration: one YAML file, validated on load, overridable with ``--set``.

Every section is a dataclass whose fields document themselves (``metadata["help"]``; ``min`` /
``max`` bound numbers), parsed by :func:`fedlora.settings.parse`: an unknown key or a bad value
(NaN and +-Inf included) raises :class:`ConfigError` (that module's ``SettingsError``) naming the
dotted key and what is allowed. ``fedlora run --set train.lr=1e-3 --set method.settings.tau=0.9``
overrides any key; ``--set`` values are read as YAML scalars first. Cross-field rules (the method
and its settings, positive Dirichlet alpha, ...) are checked after parsing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from fedlora.settings import SettingsError, describe, parse

ConfigError = SettingsError  # the one settings error, under the name the config's callers know


def _f(default: Any, help_text: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help_text, **kw})
    return field(default=default, metadata={"help": help_text, **kw})


@dataclass
class ModelConfig:
    name: str = _f("offline:smollm2-135m", "hub id, local folder, .gguf file, or offline:smollm2-135m / offline:minilm")
    kind: Literal["causal_lm", "seq_cls"] = _f("causal_lm", "model head")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype the base weights are stored in")
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    num_labels: int = _f(2, "classes, for seq_cls", min=1)
    quantization: Literal["none", "nf4", "fp4", "int8"] = _f(
        "none",
        "bitsandbytes base weights: nf4/fp4 (4-bit, double-quantized scales, computing in model.dtype) or int8 "
        "(LLM.int8()); only LoRA trains, backbone deltas go to the side path",
    )
    backbone_delta: Literal["auto", "merge", "side"] = _f(
        "auto",
        "how merging methods' backbone deltas reach the base: merge (W += delta, exact for float32 weights only), "
        "side (float32 low-rank path beside each layer, exact on any base), auto (merge iff the weights are float32)",
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = _f(
        "auto",
        "attention kernel (transformers' attn_implementation): auto = transformers' choice (sdpa where the model "
        "supports it); flash_attention_2 needs the flash-attn package and a CUDA GPU",
    )
    side_max_rank: int = _f(0, "side path: at most this many components per layer (0: no cap, exact)", min=0)
    side_rtol: float = _f(
        0.0, "side path: drop components below side_rtol * largest (0: only rounding-level ones)", min=0.0, max=1.0
    )


@dataclass
class LoRAConfig:
    rank: int = _f(8, "global LoRA rank r", min=1)
    alpha: float = _f(16.0, "LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rslora)", min=0.0)
    targets: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "module names to adapt")
    dropout: float = _f(0.0, "LoRA dropout", min=0.0, max=1.0)
    rslora: bool = _f(False, "rank-stabilised scale alpha/sqrt(r)")
    init: Literal["default", "gaussian", "pissa"] = _f(
        "default",
        "LoRA init (PEFT's init_lora_weights): default (Kaiming A, B = 0), gaussian, or pissa (top-r "
        "singular components of each weight, removed from it; FRLoRA's official init); pissa's shift of "
        "the backbone is part of the exported backbone delta",
    )
    client_ranks: dict[str, int] = _f({}, "per-client rank overrides {client_id: rank} (flexlora, flora)", min=1)


@dataclass
class MethodConfig:
    name: str = _f("fedmomentum", "registered method (fedlora methods)")
    settings: dict[str, Any] = _f({}, "method settings, e.g. {tau: 0.99}")


@dataclass
class TaskConfig:
    name: str = _f("math", "task plug-in")
    settings: dict[str, Any] = _f({}, "task settings (see the task's documentation)")


@dataclass
class PartitionConfig:
    scheme: Literal["iid", "dirichlet", "k_classes", "natural"] = _f(
        "dirichlet", "how train data is split over clients"
    )
    num_clients: int = _f(4, "number of clients", min=1)
    alpha: float = _f(0.5, "Dirichlet concentration (smaller = more skewed)", min=0.0)
    k: int = _f(2, "groups per client for k_classes", min=1)
    min_size: int = _f(8, "minimum examples per client", min=1)


@dataclass
class EngineConfig:
    backend: Literal["local", "ray"] = _f(
        "local", "who trains a round's clients: local (one after another in this process) or ray (in parallel workers)"
    )
    workers: int = _f(2, "ray: clients trained at once (one base model per worker)", min=1)
    cpus_per_worker: float = _f(1.0, "ray: CPU cores reserved per worker", min=0.0)
    gpus_per_worker: float = _f(0.0, "ray: GPUs per worker (fractions share a GPU, e.g. 0.25 = four per GPU)", min=0.0)


@dataclass
class RoundsConfig:
    num_rounds: int = _f(5, "federated rounds", min=1)
    clients_per_round: float = _f(1.0, "clients sampled per round: a count (>= 1) or a fraction (< 1)", min=0.0)
    min_clients: int = _f(1, "fewest accepted updates to aggregate; fewer skips the round", min=1)
    eval_every: int = _f(1, "evaluate the global model every k rounds (0 = only at the end)", min=0)
    eval_baseline: bool = _f(True, "evaluate the untuned base model first")
    personal_eval: Literal["auto", "on", "off"] = _f(
        "auto",
        "also evaluate each client's own model (methods with client-local parts, e.g. fedsa_lora) "
        "on a test set with its data's group mix; auto = on for those methods",
    )
    momentum: bool = _f(
        True,
        "log each round's momentum diagnostics (update cosine, path efficiency, aggregation error; "
        "engine/momentum.py), computed from factors in float64",
    )
    personal_test_size: int = _f(
        0, "most test examples per client in personal evaluation (0 = the size of the global test set)", min=0
    )


@dataclass
class TrainConfig:
    optimizer: Literal["adamw", "sgd"] = _f("adamw", "local optimizer")
    lr: float = _f(1e-3, "peak learning rate", min=0.0)
    momentum: float = _f(0.0, "SGD momentum", min=0.0)
    weight_decay: float = _f(0.0, "weight decay", min=0.0)
    schedule: Literal["constant", "linear", "cosine"] = _f("constant", "learning-rate schedule within a round")
    warmup_steps: int = _f(0, "linear warm-up steps within a round", min=0)
    round_decay: Literal["none", "cosine", "linear"] = _f("none", "peak learning rate across rounds")
    min_lr_ratio: float = _f(0.1, "final/peak learning rate of the across-round decay", min=0.0, max=1.0)
    batch_size: int = _f(4, "examples per micro-batch", min=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", min=1)
    max_steps: int = _f(10, "optimizer steps per client per round (0: use epochs)", min=0)
    epochs: float = _f(0.0, "local epochs per round when max_steps is 0", min=0.0)
    clip: float = _f(1.0, "gradient-norm clip (0 = off)", min=0.0)
    prox_mu: float = _f(
        0.0,
        "FedProx proximal weight mu: the local loss gets mu/2 ||theta - theta_start||^2 over the trained LoRA "
        "factors, theta_start = where the method started the client this round (0 = off; any method)",
        min=0.0,
    )
    scaffold: bool = _f(
        False,
        "SCAFFOLD control variates (Karimireddy et al. 2020, option II) on the factors the method averages: each "
        "local step also moves them by -lr (c - c_i); factor-averaging methods only (fedlora/methods/scaffold.py)",
    )
    optimizer_state: Literal["fresh", "carry"] = _f("fresh", "new optimizer each round, or carried per client")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "autocast dtype (auto: bf16 on GPU, fp32 on CPU)"
    )
    grad_batches: int = _f(4, "batches for full-weight gradient estimates (fedsmooth_lora)", min=1)
    gradient_checkpointing: bool = _f(
        False, "recompute activations in the backward pass (transformers' non-reentrant checkpointing): less memory"
    )
    packing: Literal["auto", "pad", "flatten"] = _f(
        "auto",
        "padding-free batches (causal LMs): flatten packs each batch's sequences into one row with per-sequence "
        "position ids; pad keeps right-padded rows; auto packs where the model keeps packed sequences apart",
    )


@dataclass
class ServerConfig:
    """Server optimizer on the round's aggregated factors (Reddi et al. 2021; fedlora.methods.server_opt)."""

    optimizer: Literal["none", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] = _f(
        "none",
        "server optimizer on the averaged factors (Reddi et al. 2021): none = the method's own aggregate; "
        "factor-averaging methods only (fedit, ffa_lora, rolora, fedsa_lora's A, fedrot_lora)",
    )
    lr: float = _f(1.0, "server learning rate eta (the adaptive optimizers usually want 1e-2..1e-1)", min=0.0)
    momentum: float = _f(0.9, "fedavgm: momentum beta", min=0.0, max=1.0)
    beta1: float = _f(0.9, "fedadagrad/fedadam/fedyogi: first-moment decay beta1", min=0.0, max=1.0)
    beta2: float = _f(0.99, "fedadam/fedyogi: second-moment decay beta2", min=0.0, max=1.0)
    tau: float = _f(
        1e-3, "fedadagrad/fedadam/fedyogi: adaptivity tau > 0 (step m / (sqrt(v) + tau), v starts at tau^2)", min=0.0
    )


@dataclass
class PrivacyConfig:
    """Differential privacy (fedlora/engine/privacy.py says what each mode clips and noises, per method)."""

    mode: Literal["none", "client", "sample"] = _f(
        "none",
        "none; client: client-level DP-FedAvg (each client's round update clipped to privacy.clip, Gaussian noise "
        "on the server's mean, or on each upload for methods that combine individual factors); sample: DP-SGD on "
        "the clients' trainable LoRA parameters (per-example clipping, noise per step)",
    )
    epsilon: float | None = _f(
        None,
        "the privacy budget over the whole run; the noise multiplier is calibrated to it (sample: each client's own, "
        "at its own size) (or noise_multiplier)",
    )
    delta: float = _f(1e-5, "delta of the (epsilon, delta) guarantee, in (0, 1)")
    noise_multiplier: float | None = _f(
        None, "sigma: noise std / clip; with epsilon as well, the run is refused if it would spend more than epsilon"
    )
    clip: float = _f(1.0, "L2 bound C: of a client's round update (client) or of one example's gradient (sample)")
    accountant: Literal["rdp", "prv"] = _f(
        "rdp", "Opacus accountant: rdp (Renyi DP, the usual report) or prv (tighter, slower; for epsilon below ~0.5)"
    )


@dataclass
class LoggingConfig:
    trackers: list[str] = _f(
        [],
        "experiment trackers mirroring metrics.jsonl and summary.json, the config as hyper-parameters: tensorboard "
        "(<run>/tensorboard/), wandb (<run>/wandb/), mlflow (<run>/mlflow.db); each an optional package "
        "(pip install 'fedlora[trackers]')",
    )
    project: str = _f("", "W&B project and MLflow experiment ('': the run name)")
    wandb_mode: Literal["offline", "online"] = _f(
        "offline", "W&B: offline writes <run>/wandb/ only (wandb sync uploads it later); online needs a login"
    )
    mlflow_uri: str = _f("", "MLflow tracking URI ('': sqlite:///<run>/mlflow.db, local and offline)")


@dataclass
class Config:
    name: str = _f("default", "run name: outputs go to <output_dir>/<name>")
    seed: int = _f(0, "seed of everything (data, partition, sampling, init, dropout)")
    output_dir: str = _f("runs", "where run folders are written")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- parsing ----------------------------------------------------------------------------------
def _parse_scalar(text: str) -> Any:
    """A ``--set`` value as YAML would read it (numbers, booleans, lists), else the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, str]) -> dict[str, Any]:
    """Set dotted keys (``train.lr=1e-3``) in a nested dict; values parsed as YAML scalars."""
    for dotted, text in overrides.items():
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(text)
    return data


def load_config(path: str | Path | None = None, overrides: Mapping[str, str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply ``overrides``, validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    return config_from_dict(apply_overrides(data, overrides or {}))


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Validate a nested dict (a parsed YAML file, or ``Config.to_dict()``) into a :class:`Config`."""
    cfg = parse(Config, data)
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    """Cross-field checks (the method exists and its settings parse, etc.)."""
    from fedlora.methods import build_method
    from fedlora.methods.scaffold import check_scaffold
    from fedlora.methods.server_opt import check_server_optimizer

    try:
        method = build_method(cfg.method.name, cfg.method.settings)
    except ValueError as exc:
        raise ConfigError(f"method: {exc}") from None
    from fedlora.engine.privacy import check_privacy

    try:
        check_server_optimizer(method, cfg.server)
        if cfg.train.scaffold:
            check_scaffold(method)
        check_privacy(cfg, method)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.train.scaffold and cfg.train.lr <= 0:
        raise ConfigError(
            f"train.scaffold needs train.lr > 0 (its variates are per unit learning rate), got {cfg.train.lr}"
        )
    if cfg.partition.scheme == "dirichlet" and cfg.partition.alpha <= 0:
        raise ConfigError(f"partition.alpha={cfg.partition.alpha} must be positive for the dirichlet scheme")
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        raise ConfigError("train.max_steps and train.epochs are both 0: set one of them")
    if cfg.rounds.clients_per_round > cfg.partition.num_clients:
        raise ConfigError(
            f"rounds.clients_per_round={cfg.rounds.clients_per_round} exceeds "
            f"partition.num_clients={cfg.partition.num_clients}"
        )
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"name={cfg.name!r} must be a plain folder name")
    if cfg.model.quantization != "none" and cfg.model.backbone_delta == "merge":
        raise ConfigError(
            f"model.backbone_delta=merge cannot add deltas to {cfg.model.quantization} weights: use side or auto"
        )
    _check_device(cfg.model.device)
    _check_attention(cfg.model.attention)
    _check_model_name(cfg.model.name)
    if cfg.rounds.clients_per_round <= 0:
        raise ConfigError(
            f"rounds.clients_per_round={cfg.rounds.clients_per_round} samples no client: "
            "a count >= 1 or a fraction in (0, 1)"
        )
    if cfg.engine.backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("engine.backend=ray needs Ray (pip install 'fedlora[flower]' installs it)")
        per_round = clients_per_round(cfg, cfg.partition.num_clients)
        if cfg.engine.workers > per_round:
            raise ConfigError(
                f"engine.workers={cfg.engine.workers} exceeds the {per_round} clients trained per round "
                "(rounds.clients_per_round): the extra workers would only hold models"
            )
        if cfg.engine.gpus_per_worker > 0:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"engine.gpus_per_worker={cfg.engine.gpus_per_worker} but this machine has no GPU")
    _check_trackers(cfg.logging.trackers)
    if cfg.train.packing == "flatten" and cfg.model.kind != "causal_lm":
        raise ConfigError(
            f"train.packing=flatten packs causal-LM sequences; model.kind={cfg.model.kind!r} batches stay padded: "
            "use auto or pad"
        )
    if cfg.lora.init == "pissa" and (cfg.model.quantization != "none" or cfg.model.dtype != "float32"):
        raise ConfigError(
            "lora.init=pissa moves each weight's top-r part out of the base weights, which only float32 weights "
            f"hold exactly (model.dtype={cfg.model.dtype}, model.quantization={cfg.model.quantization}): "
            "use lora.init=default, or a float32 base"
        )


def clients_per_round(cfg: Config, num_clients: int) -> int:
    """How many of ``num_clients`` clients a round samples (``rounds.clients_per_round``: a count,
    or a fraction of the clients when below 1)."""
    c = cfg.rounds.clients_per_round
    return min(num_clients, int(c)) if c >= 1 else max(1, round(c * num_clients))


def _check_device(name: str) -> None:
    """``model.device``: auto, cpu, cuda, cuda:N or mps (whether this machine has it is checked
    where the run starts, :func:`fedlora.engine.setup.device_for`: a run folder stays readable,
    exportable and evaluable on a machine without its GPU)."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model.device={name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"model.device={name!r}: fedlora runs on cpu or cuda")


def _check_attention(attention: str) -> None:
    if attention != "flash_attention_2":
        return
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attention=flash_attention_2 needs the flash-attn package (pip install flash-attn)")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("model.attention=flash_attention_2 runs on a CUDA GPU only and this machine has none")


def _check_trackers(names: list[str]) -> None:
    """``logging.trackers``: known names, each once, each with its packages installed (checked here,
    before any model loads)."""
    from fedlora.runs.trackers import missing_packages, tracker_names

    known = tracker_names()
    for name in names:
        if name not in known:
            raise ConfigError(f"logging.trackers: unknown tracker {name!r}; use {', '.join(known)}")
        missing = missing_packages(name)
        if missing:
            raise ConfigError(
                f"logging.trackers: {name} needs the {' and '.join(missing)} package"
                f"{'s' if len(missing) > 1 else ''} (pip install {' '.join(missing)}, "
                "or pip install 'fedlora[trackers]' for all trackers)"
            )
    if len(set(names)) < len(names):
        raise ConfigError(f"logging.trackers={names}: a tracker is named twice")


def _check_model_name(name: str) -> None:
    """A ``model.name`` written as a path (``/``, ``./``, ``~``) must exist; hub ids are not checked here."""
    looks_local = name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")
    if looks_local and not Path(name).expanduser().exists():
        raise ConfigError(f"model.name={name!r}: no such file or folder (a hub id has no leading / or ./)")


def describe_config(cls: type = Config) -> list[str]:
    """``key (type, default): help`` lines for the whole schema (docs and ``--help``)."""
    return [doc.line() for doc in describe(cls)]


def schema_markdown() -> str:
    """``docs/config.md``: the whole schema as a Markdown table (kept in sync by a test)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for doc in describe(Config):
        rows.append(f"| `{doc.key}` | {doc.kind.replace('|', ' / ')} | `{doc.default!r}` | {doc.help} |")
    head = (
        "# Experiment configuration\n\n"
        "`fedlora run CONFIG.yaml` reads one YAML file with the sections below (every key optional; "
        "defaults shown). Any key can be overridden on the command line: "
        "`--set train.lr=5e-4 --set method.settings.tau=0.9`. Unknown keys and bad values are errors "
        "that name the key and what is allowed. Method settings are listed by `fedlora methods`. "
        "Shipped presets: `src/fedlora/configs/` (`default`, `ci`).\n\n"
        "Generated from `fedlora.engine.config` (`python -m fedlora.engine.config > docs/config.md`).\n\n"
    )
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(schema_markdown(), end="")
