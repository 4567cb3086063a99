"""The scenario schema: one validated, frozen description of a run.

A scenario file (TOML) is read, ``--set key=value`` overrides are applied to the raw tables, and the
result is validated here *before any work starts*. The validated scenario then travels to the
ServerApp and every ClientApp as a single JSON string in Flower's ``run_config["scenario"]``, so the
in-process, Ray and deployment engines all see exactly the same values.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from scenarios.devices import DevicesConfig
from scenarios.registry import UnknownAlgorithm, algorithm_config, algorithm_names

RUN_CONFIG_KEY = "scenario"


class ScenarioError(ValueError):
    """A scenario that cannot run; the message names the key and what is allowed."""


class _Strict(BaseModel):
    # No inf/NaN anywhere: no knob means anything at infinity here, and JSON (how the scenario
    # travels in run_config) would turn them into null, so a run could not even restart from them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(_Strict):
    """Which data, how it is split across clients, and what each client keeps for local testing."""

    dataset: Literal["mnist1d", "digits", "synthetic", "hub"] = "mnist1d"
    num_clients: int = Field(10, ge=1, le=100_000)
    partitioner: Literal["iid", "dirichlet", "pathological", "shard", "size"] = "iid"
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration (partitioner=dirichlet)")
    min_partition_size: int = Field(
        10, ge=0, description="Dirichlet: resample until every client has this many"
    )
    classes_per_client: int = Field(2, ge=1, description="pathological: labels per client")
    shards_per_client: int = Field(2, ge=1, description="shard: shards per client")
    size_skew: Literal["linear", "square", "exponential"] = "linear"
    local_test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="share of each client's data kept as its local test split"
    )
    proxy_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="share of train carved out for the server before partitioning",
    )
    num_samples: int | None = Field(
        None, ge=50, description="mnist1d / synthetic: total samples generated"
    )
    synthetic_alpha: float = Field(
        1.0, ge=0.0, description="LEAF Synthetic(alpha, beta): model heterogeneity"
    )
    synthetic_beta: float = Field(
        1.0, ge=0.0, description="LEAF Synthetic(alpha, beta): data heterogeneity"
    )
    hub_path: str | None = Field(
        None, description="dataset=hub: a HF hub name, or a builder such as 'parquet'"
    )
    hub_data_files: dict[str, str] | None = Field(
        None, description="dataset=hub: local files per split"
    )
    hub_feature_key: str = "image"
    hub_label_key: str = "label"
    # Concept shift (clients/concept_shift.py): applied to the clients' rows after partitioning.
    concept_shift: Literal["none", "label_permutation", "rotation", "feature_shift"] = Field(
        "none",
        description="per-group transform of the clients' train and local test rows; group 0 "
        "keeps the original task (as the central test set does)",
    )
    num_groups: int = Field(
        1, ge=1, description="concept_shift: clients split evenly into this many groups"
    )

    @model_validator(mode="after")
    def _hub_needs_path(self) -> DataConfig:
        if self.dataset == "hub" and not self.hub_path:
            raise ValueError(
                "dataset = 'hub' needs data.hub_path (e.g. 'ylecun/mnist' or 'parquet')"
            )
        return self

    @model_validator(mode="after")
    def _groups_fit(self) -> DataConfig:
        if self.concept_shift == "none" and self.num_groups != 1:
            raise ValueError(
                f"data.num_groups={self.num_groups} splits clients into concept-shift groups, but "
                "data.concept_shift = 'none'; set data.concept_shift (label_permutation, "
                "rotation or feature_shift) or drop data.num_groups"
            )
        if self.concept_shift != "none" and self.num_groups < 2:
            raise ValueError(
                f"data.concept_shift={self.concept_shift!r} needs data.num_groups >= 2 (one "
                "group is the same task for everybody); set e.g. data.num_groups = 4"
            )
        if self.num_groups > self.num_clients:
            raise ValueError(
                f"data.num_groups={self.num_groups} exceeds data.num_clients={self.num_clients}: "
                "every group needs a client; lower data.num_groups or raise data.num_clients"
            )
        return self


class ModelConfig(_Strict):
    """A model from the zoo; input shape and class count come from the dataset."""

    name: Literal["mlp", "cnn1d", "cnn2d", "softmax", "ff_mlp"] = "mlp"
    hidden: list[int] = Field(
        default_factory=lambda: [64, 64], description="mlp / ff_mlp: hidden widths"
    )
    channels: int = Field(16, ge=1, description="cnn: channels of the first conv layer")

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError("every hidden width must be >= 1")
        return v


class TrainConfig(_Strict):
    """Local training of every client (algorithms may add their own terms on top)."""

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)


class FederationConfig(_Strict):
    """Who takes part each round."""

    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(
        0.0, ge=0.0, le=1.0, description="clients asked to evaluate on their local test split"
    )
    min_train_clients: int = Field(1, ge=1)
    round_timeout_s: float = Field(3600.0, gt=0.0)
    wait_for_nodes_s: float = Field(
        300.0,
        gt=0.0,
        description="stop with an error if fewer than data.num_clients nodes connect in this time",
    )


class EngineConfig(_Strict):
    """Where the same ServerApp/ClientApp run."""

    name: Literal["inprocess", "packed", "ray", "deployment"] = "inprocess"
    num_cpus: int = Field(1, ge=1, description="ray: CPUs per client actor")
    num_gpus: float = Field(0.0, ge=0.0, description="ray: (fractional) GPUs per client actor")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    client_threads: int = Field(
        1, ge=1, description="torch threads per client (1 keeps engines bit-identical)"
    )
    port: int = Field(
        0, ge=0, le=65535, description="ray/deployment: SuperLink port (0 = pick a free one)"
    )
    pack_size: int = Field(
        256, ge=1, description="packed: clients trained together at most (bounds memory)"
    )
    ray_address: str = Field(
        "",
        description=(
            "ray: the Ray cluster to join ('auto' = the one `ray start` made on this machine, or "
            "'HOST:PORT' of its head); empty = start a private single-machine Ray runtime"
        ),
    )

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, v: str) -> str:
        v = v.strip()
        if v in ("", "auto", "local") or v.startswith("ray://"):
            return "" if v == "local" else v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"engine.ray_address={v!r} is not a Ray address: use 'auto' (the cluster `ray "
                "start` made on this machine), 'HOST:PORT' of the head node (e.g. "
                "'10.0.0.5:6379', the port `ray start --head --port` printed), or '' for a "
                "private local runtime"
            )
        return v

    @model_validator(mode="after")
    def _ray_only(self) -> EngineConfig:
        if self.ray_address and self.name != "ray":
            raise ValueError(
                f"engine.ray_address={self.ray_address!r} joins a Ray cluster, which only the ray "
                f"engine uses (engine.name={self.name!r}): set engine.name='ray' or drop ray_address"
            )
        return self


class PersonalizationConfig(_Strict):
    """Personalized evaluation: each evaluating client fine-tunes the model it receives on its local
    train split (``finetune_epochs`` epochs, or ``finetune_steps`` SGD steps when > 0, at
    ``train.lr``) and reports its local test accuracy before (``local_accuracy``) and after
    (``personalized_accuracy``). 0 epochs and 0 steps = off. Needs federation.fraction_evaluate > 0."""

    finetune_epochs: int = Field(0, ge=0, description="local fine-tuning epochs before testing")
    finetune_steps: int = Field(0, ge=0, description="fine-tuning SGD steps (overrides epochs)")
    evaluate_every: int = Field(
        1, ge=1, description="evaluate every N rounds (the last round is always evaluated)"
    )

    @property
    def enabled(self) -> bool:
        return self.finetune_epochs > 0 or self.finetune_steps > 0


class EdgeConfig(_Strict):
    """Edge clients: which clients use a backprop-free / LoRA trainer, and those trainers' knobs.

    ``trainers`` maps a client selector to a trainer name; a selector is a partition id (``"3"``),
    an inclusive range (``"0-4"``) or ``"*"`` (every other client). Unlisted clients use the
    algorithm's own trainer. Example: ``trainers = {"0-4" = "tpsgd", "5" = "forward_forward"}``.
    """

    trainers: dict[str, str] = Field(
        default_factory=dict, description="client selector ('3', '0-4', '*') -> trainer name"
    )
    tpsgd_loss: Literal["mse", "ce"] = Field(
        "ce",
        description="tpSGD hidden-layer loss: CE of a fixed random readout, or MSE to "
        "ReLU(sqrt(C) B_l y) (beats CE on digits, no better than untrained hidden layers on mnist1d)",
    )
    ff_threshold: float = Field(
        0.5,
        gt=0.0,
        description="forward-forward threshold on mean goodness (0.5 beat 2.0 on digits)",
    )
    ff_lr: float = Field(0.01, gt=0.0, description="forward-forward Adam learning rate")
    export_onnx: bool = Field(
        True, description="write the final model as .onnx (+ int8) when edge clients take part"
    )

    @field_validator("trainers")
    @classmethod
    def _selectors(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            parts = key.split("-")
            if key != "*" and not (1 <= len(parts) <= 2 and all(p.isdigit() for p in parts)):
                raise ValueError(
                    f"client selector {key!r} must be a partition id ('3'), a range ('0-4') or '*'"
                )
            if len(parts) == 2 and int(parts[0]) > int(parts[1]):
                raise ValueError(
                    f"client selector {key!r} is a reversed range; write it low-high "
                    f"('{parts[1]}-{parts[0]}')"
                )
        return v

    def selector_ids(self, selector: str) -> range | None:
        """The partition ids a selector names (None for '*')."""
        if selector == "*":
            return None
        lo, _, hi = selector.partition("-")
        return range(int(lo), int(hi or lo) + 1)


# robustness.direction_reference (server/preaggregation.py)
DIRECTION_REFERENCES = ("median", "previous", "both")


class RobustnessConfig(_Strict):
    """Server-side fault tolerance: which training replies are aggregated, and checkpoints."""

    validate_replies: bool = Field(
        True, description="check every train reply (finite, keys, shapes, dtypes, norm, size)"
    )
    max_update_norm: float = Field(
        1e4, gt=0.0, description="exclude replies whose ||w_client - w_sent||_2 exceeds this"
    )
    max_reply_factor: float = Field(
        4.0, ge=1.0, description="exclude replies larger than this many times the model sent"
    )
    checkpoint: bool = Field(
        True, description="write checkpoint.pt after every round (enables `fedge run --resume`)"
    )
    max_skipped_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="the run fails (exit 1, status 'failed' in summary.json) when more than this "
        "share of its rounds aggregated nothing; a run that aggregated no round always fails",
    )
    # poisoning defences (README "Poisoning: attacks and defences")
    aggregation: Literal[
        "mean",
        "median",
        "trimmed_mean",
        "krum",
        "multikrum",
        "bulyan",
        "geometric_median",
        "centered_clipping",
    ] = Field(
        "mean",
        description="fedavg/fedprox: Flower's FedAvg (mean), FedMedian, FedTrimmedAvg, Krum, "
        "MultiKrum or Bulyan; or fedge's geometric_median (RFA) or centered_clipping",
    )
    trim_beta: float = Field(
        0.2, ge=0.0, lt=0.5, description="trimmed_mean: share cut from each end per coordinate"
    )
    num_malicious: int = Field(
        1, ge=0, description="krum/multikrum/bulyan: attackers to tolerate per round (f)"
    )
    relative_norm_bound: float = Field(
        3.0,
        ge=0.0,
        description="exclude replies whose update norm exceeds this multiple of the round's "
        "median update norm (0: off). Works with every algorithm",
    )
    max_weight_share: float | Literal["auto"] = Field(
        "auto",
        description="no reply gets more than this share of the aggregate's weight "
        "(num-examples capped by water filling; 1: off); 'auto' = 1.5 / the round's replies. "
        "Works with every algorithm that weights by num-examples",
    )
    direction_check: bool = Field(
        True,
        description="exclude replies whose update points away from the consensus: cosine below "
        "direction_threshold with the round's coordinate-wise median update and (with "
        "direction_reference = 'both', the default) with the server's previous step (sign flip, "
        "IPM; honest norms pass the norm bound). Every algorithm with dense replies; sparse "
        "(lora_sparse) replies are not checked",
    )
    direction_threshold: float = Field(
        -0.15,
        description="direction_check: the lowest cosine kept, in [-1, 1) (-0.15: an honest "
        "label-skewed client at Dirichlet 0.1 dips to about -0.1 against both references; a "
        "sign-flipped or IPM update sits at -0.3 to -1)",
    )
    direction_scope: Literal["body", "all"] = Field(
        "body",
        description="direction_check compares 'body': every array before the model's last "
        "weight matrix (its output layer, where label-skewed clients legitimately disagree), or "
        "'all' arrays",
    )
    direction_reference: str = Field(
        "both",
        description="direction_check compares each update with 'median': the round's "
        "coordinate-wise median update; 'previous': the server's previous step (the model it "
        "sent this round minus the one it sent the round before to the same group of nodes; "
        "the median in the first round or when none can be identified); 'both': excluded only "
        "if below direction_threshold against both (honest label-skewed clients, which point "
        "against the median, mostly still agree with the server's last step)",
    )
    clip_radius: float = Field(
        0.0,
        ge=0.0,
        description="centered_clipping: clipping radius tau around the center (0: the median "
        "distance of the round's updates to it)",
    )
    clip_iterations: int = Field(1, ge=1, le=100, description="centered_clipping: iterations")
    preaggregation: Literal["none", "bucketing", "nnm"] = Field(
        "none",
        description="transform the round's updates before any aggregation rule, every "
        "algorithm: bucketing (means of random buckets of bucket_size) or nnm (each update the "
        "mean of its n - num_malicious nearest)",
    )
    bucket_size: int = Field(2, ge=1, description="preaggregation = bucketing: bucket size s")
    trust_scoring: bool = Field(
        False,
        description="FLTrust: weight each update by ReLU(cos) with one trained on the server's "
        "proxy set (data.proxy_fraction > 0) and rescale it to that one's norm; every algorithm",
    )

    dp_clipping_norm: float = Field(
        0.0,
        ge=0.0,
        description="fedavg/fedprox: > 0 wraps the strategy in Flower's "
        "DifferentialPrivacyServerSideFixedClipping with this clipping norm (0: off)",
    )
    dp_noise_multiplier: float = Field(
        0.0, ge=0.0, description="with dp_clipping_norm: Gaussian noise multiplier (0: clip only)"
    )

    @field_validator("direction_threshold")
    @classmethod
    def _direction_threshold(cls, v: float) -> float:
        if not -1.0 <= v < 1.0:
            raise ValueError(
                f"robustness.direction_threshold={v!r} must be a cosine in [-1, 1) (-1 keeps "
                "every update; turn the check off with robustness.direction_check = false)"
            )
        return v

    @field_validator("direction_reference")
    @classmethod
    def _direction_reference(cls, v: str) -> str:
        if v not in DIRECTION_REFERENCES:
            raise ValueError(
                f"robustness.direction_reference={v!r} is not one of "
                f"{', '.join(repr(r) for r in DIRECTION_REFERENCES)} ('median': the round's "
                "median update; 'previous': the server's previous step; 'both': excluded only if "
                "against both)"
            )
        return v

    @field_validator("max_weight_share")
    @classmethod
    def _share(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 < v <= 1.0:
            raise ValueError(
                f"robustness.max_weight_share={v!r} must be 'auto' or a share in (0, 1] "
                "(1 turns the cap off)"
            )
        return v


def robust_aggregation_algorithms() -> tuple[str, ...]:
    """Algorithms whose server aggregates with FedAvg's rule, which a robust rule can replace:
    those whose declaration says ``fedavg_aggregation`` (algorithms/base.py)."""
    return tuple(
        n for n in algorithm_names() if getattr(algorithm_config(n), "fedavg_aggregation", False)
    )


class AttackConfig(_Strict):
    """Simulated poisoning by some clients (a client mod, so every trainer gets it)."""

    kind: Literal[
        "none",
        "sign_flip",
        "scale",
        "gaussian",
        "label_flip",
        "free_rider",
        "inflated_weight",
        "alie",
        "ipm",
    ] = "none"
    clients: list[int] = Field(
        default_factory=list, description="partition ids of the attacking clients"
    )
    strength: float | None = Field(
        None,
        ge=0.0,
        allow_inf_nan=False,
        description="sign_flip: factor of the flipped update (default 1); scale: update "
        "multiplier (10); gaussian: std of the noise that replaces the update (1); free_rider: "
        "std of noise added to the unchanged model (0); label_flip: unused; inflated_weight: "
        "the num-examples claimed (1e9); alie: z of "
        "mean - z*std (Baruch et al.'s z from the number of clients and attackers); ipm: "
        "epsilon of -epsilon*mean (0.1). alie and ipm are simulated on the server, which shows "
        "the attackers the round's honest updates (simulation only)",
    )


class TrackingConfig(_Strict):
    """Experiment trackers that receive every round's metrics (all numbers of the round's
    ``metrics.jsonl`` record) and the scenario as hyperparameters. Optional extras:
    ``pip install 'fedge[tracking]'``; neither package is imported unless its switch is on."""

    tensorboard: bool = Field(False, description="TensorBoard event files in <run>/tensorboard")
    mlflow: bool = Field(False, description="an MLflow run, with the run folder as its artifacts")
    mlflow_uri: str = Field(
        "",
        description="MLflow tracking URI; empty = the file store mlruns/ next to the run folder "
        "(in <output_dir>, so the runs of one output_dir or sweep share one store)",
    )
    mlflow_experiment: str = Field("fedge", min_length=1, description="MLflow experiment name")


class Scenario(_Strict):
    """A whole run. ``num_rounds``, ``seed`` and ``output_dir`` exist in every scenario."""

    name: str = "run"
    seed: int = 0
    num_rounds: int = Field(3, ge=1)
    output_dir: str = "results"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    # The algorithm's own declaration (algorithms/<name>.py or a plug-in), found by name.
    algorithm: SerializeAsAny[BaseModel] = Field(
        default_factory=lambda: algorithm_config("fedavg")()
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    devices: DevicesConfig | None = Field(
        None, description="simulated device fleet + virtual clock (None: no device simulation)"
    )
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)

    edge: EdgeConfig = Field(default_factory=EdgeConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # The name becomes a folder under output_dir: a path part would write outside it.
        bad = [c for c in ("/", "\\", "\x00") if c in value]
        if bad or value.strip(".").strip() == "":
            raise ValueError(
                f"run name {value!r} must be one plain folder name (no '/', '\\', NUL, and not "
                "'', '.' or '..'), because runs are written to <output_dir>/<name>-...; "
                "to write elsewhere set output_dir (or pass --run-dir)"
            )
        return value

    @field_validator("algorithm", mode="before")
    @classmethod
    def _resolve_algorithm(cls, value: Any) -> BaseModel:
        if isinstance(value, BaseModel):
            return value
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise ValueError(f"needs a table with `name`, one of: {', '.join(algorithm_names())}")
        try:
            declared = algorithm_config(value["name"])
        except UnknownAlgorithm:
            names = algorithm_names()
            raise ValueError(
                f"unknown algorithm {value['name']!r}{did_you_mean(value['name'], set(names))}; "
                f"allowed: {', '.join(names)}"
            ) from None
        return declared.model_validate(value)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if self.federation.min_train_clients > self.data.num_clients:
            raise ValueError(
                f"federation.min_train_clients={self.federation.min_train_clients} exceeds "
                f"data.num_clients={self.data.num_clients}"
            )
        if (
            getattr(self.algorithm, "needs_server_proxy", lambda: False)()
            and self.data.proxy_fraction == 0
        ):
            raise ValueError(
                f"algorithm {self.algorithm.name!r} needs a server proxy set, but "
                "data.proxy_fraction = 0; set it (e.g. 0.02)"
                + (
                    " or algorithm.proxy_file"
                    if "proxy_file" in type(self.algorithm).model_fields
                    else ""
                )
            )
        self._check_attack_and_defense()
        for selector in self.edge.trainers:
            ids = self.edge.selector_ids(selector)
            if ids is not None and ids.stop > self.data.num_clients:
                raise ValueError(
                    f"edge.trainers selector {selector!r} names client {ids.stop - 1}, but "
                    f"data.num_clients={self.data.num_clients} has ids 0..{self.data.num_clients - 1}"
                    "; fix the selector or raise data.num_clients"
                )
        if self.personalization.enabled and self.federation.fraction_evaluate == 0:
            raise ValueError(
                "personalization fine-tunes during client evaluation, but "
                "federation.fraction_evaluate = 0; set it > 0 (e.g. 1.0)"
            )
        return self

    def _check_attack_and_defense(self) -> None:
        attack, defense, algo = self.attack, self.robustness, self.algorithm.name
        declared = type(self.algorithm)  # what the algorithm can do (algorithms/base.py)
        fedavg_family = getattr(declared, "fedavg_aggregation", False)
        bad = sorted({c for c in attack.clients if not 0 <= c < self.data.num_clients})
        if bad:
            raise ValueError(
                f"attack.clients {bad} are not partition ids 0..{self.data.num_clients - 1}"
            )
        if len(set(attack.clients)) != len(attack.clients):
            raise ValueError(f"attack.clients {attack.clients} lists a client twice")
        if attack.kind != "none" and not attack.clients:
            raise ValueError(f"attack.kind={attack.kind!r} needs attack.clients (partition ids)")
        if attack.kind != "none" and getattr(declared, "sparse_replies", False):
            raise ValueError(
                f"attacks rewrite dense model replies; {algo} replies are sparse adapter "
                "updates: set attack.kind='none' or another algorithm"
            )
        if defense.aggregation != "mean" and not fedavg_family:
            raise ValueError(
                f"robustness.aggregation={defense.aggregation!r} replaces FedAvg's mean and works "
                f"with {' and '.join(robust_aggregation_algorithms())} only; {algo!r} aggregates "
                "its own way. Use robustness.relative_norm_bound (every algorithm) instead"
            )
        if defense.dp_clipping_norm > 0 and not fedavg_family:
            raise ValueError(
                f"robustness.dp_clipping_norm wraps FedAvg-style strategies and works with "
                f"{' and '.join(robust_aggregation_algorithms())} only, not {algo!r}"
            )
        if (defense.preaggregation != "none" or defense.trust_scoring) and algo == "lora_sparse":
            raise ValueError(
                "robustness.preaggregation and trust_scoring transform dense model updates; "
                "lora_sparse replies are sparse adapter updates: turn them off for lora_sparse"
            )
        if defense.trust_scoring and self.data.proxy_fraction == 0:
            raise ValueError(
                "robustness.trust_scoring trains a reference update on the server's proxy set, "
                "but data.proxy_fraction = 0; set it (e.g. 0.02)"
            )
        sampled = max(1, math.ceil(self.federation.fraction_train * self.data.num_clients))
        f = defense.num_malicious
        if defense.preaggregation == "nnm" and f >= sampled:
            raise ValueError(
                f"robustness.preaggregation='nnm' mixes each update with its n - num_malicious "
                f"nearest, but robustness.num_malicious={f} >= the {sampled} clients sampled; "
                "lower robustness.num_malicious"
            )
        need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}
        if defense.aggregation in need and sampled < need[defense.aggregation]:
            raise ValueError(
                f"robustness.aggregation={defense.aggregation!r} with robustness.num_malicious={f} "
                f"needs at least {need[defense.aggregation]} replies per round, but only "
                f"{sampled} clients are sampled; lower robustness.num_malicious or raise "
                "federation.fraction_train / data.num_clients"
            )

    # -- transport ---------------------------------------------------------------------------
    def to_run_config(self) -> dict[str, str]:
        """What Flower's ``run_config`` carries: the whole scenario as one JSON string."""
        return {RUN_CONFIG_KEY: self.model_dump_json()}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> Scenario:
        """Inverse of :meth:`to_run_config`; an empty/missing entry means the default scenario."""
        raw = run_config.get(RUN_CONFIG_KEY, "")
        return validate_scenario(json.loads(raw) if raw else {})

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()


# ---------------------------------------------------------------------------------------------
def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(e["loc"])
            msg = (
                f"unknown key{did_you_mean(str(e['loc'][-1]), allowed)}; allowed keys here: "
                f"{', '.join(allowed)}"
            )
        elif e["type"] == "literal_error":
            expected = re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))
            msg += did_you_mean(str(e.get("input")), expected)
        got = e.get("input")
        shown = (
            ""
            if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        lines.append(f"  {key or '<scenario>'}: {msg}{shown}")
    return "invalid scenario:\n" + "\n".join(lines)


def did_you_mean(word: str, choices: list[str] | set[str]) -> str:
    """``" (did you mean 'alpha'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Scenario
    parts = list(loc[:-1])
    while parts:
        part = str(parts.pop(0))
        field = model.model_fields.get(part)
        if field is None:
            break
        if part == "algorithm":
            return sorted({k for n in algorithm_names() for k in algorithm_config(n).model_fields})
        inner = _table_model(field.annotation)
        if inner is None:
            break
        model, keyed = inner
        if keyed and parts:  # dict[str, Model]: the next part is the user's own name
            parts.pop(0)
    return sorted(model.model_fields)


def _table_model(ann: Any) -> tuple[type[BaseModel], bool] | None:
    """The model a field's table validates against (through ``X | None`` and ``dict[str, X]``),
    and whether it is keyed by the user's own names; None for a plain value."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, False
    args = typing.get_args(ann)
    if typing.get_origin(ann) is dict and len(args) == 2:
        inner = _table_model(args[1])
        return (inner[0], True) if inner is not None else None
    for arg in args:  # Optional / Union
        inner = _table_model(arg)
        if inner is not None:
            return inner
    return None


def validate_scenario(raw: dict[str, Any]) -> Scenario:
    """Validate raw tables; raise :class:`ScenarioError` naming every bad key."""
    try:
        return Scenario.model_validate(raw)
    except ValidationError as err:
        raise ScenarioError(_format_errors(err)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"data.alpha=0.1"`` -> (["data", "alpha"], 0.1). Values are TOML literals; bare words are strings."""
    if "=" not in item:
        raise ScenarioError(f"override {item!r} must look like key=value (dotted keys for tables)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ScenarioError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key.split("."), value


Overrides = typing.Sequence[str] | typing.Mapping[str, Any]


def apply_overrides(raw: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    """Return a copy of ``raw`` with each override applied (nested tables by dots): ``key=value``
    strings (values are TOML literals) or a mapping of dotted keys to Python values."""
    out = json.loads(json.dumps(raw))
    if isinstance(overrides, str):  # one "k=v", not a sequence of one-letter overrides
        overrides = [overrides]
    if isinstance(overrides, typing.Mapping):
        pairs = [
            (str(key).split("."), value, f"{key}={value!r}") for key, value in overrides.items()
        ]
    else:
        pairs = [(*parse_override(item), item) for item in overrides]
    for path, value, item in pairs:
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ScenarioError(f"override {item!r}: {part!r} is not a table")
        node[path[-1]] = value
    return out


def load_scenario(path: str | Path, overrides: Overrides | None = None) -> Scenario:
    """Read a TOML scenario, apply overrides, validate. Errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(
            f"scenario file not found: {path} (ship one under scenarios/, e.g. scenarios/quickstart.toml)"
        )
    return scenario_from_toml(path.read_text(), overrides, source=str(path), name=path.stem)


def scenario_from_toml(
    text: str, overrides: Overrides | None = None, source: str = "<string>", name: str = "run"
) -> Scenario:
    """Parse scenario TOML text, apply overrides, validate; ``name`` when the text sets none.
    Errors start with ``source`` (the file, or ``<string>``)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{source}: not valid TOML: {err}") from None
    raw.setdefault("name", name)
    try:
        return validate_scenario(apply_overrides(raw, overrides or []))
    except ScenarioError as err:
        raise ScenarioError(f"{source}: {err}") from None


def scenario_to_toml(scenario: Scenario) -> str:
    """The resolved scenario as TOML (rerunnable with ``fedge run``)."""
    import tomli_w

    data = json.loads(scenario.model_dump_json(exclude_none=True))
    return tomli_w.dumps(data)
